"""Media in prompts: content parts to items, fetch requests for the runtime, decoding and checks.

Pure code: bytes in, decoded items or `ProtocolError`s out. Fetching a URL is IO, so the core asks
its runtime for it (`protocol.outputs.Fetch`) and is fed the bytes back (`MediaFetched`).
"""
