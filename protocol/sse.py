"""Server-sent events framing for streamed responses (`data: <json>\\n\\n`, then `data: [DONE]`)."""

from __future__ import annotations

from protocol.errors import ProtocolError

SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
)
DONE_FRAME = b"data: [DONE]\n\n"


def data_frame(json_payload: bytes) -> bytes:
    """One SSE event carrying an already-encoded JSON document (which never contains a newline)."""
    return b"data: " + json_payload + b"\n\n"


def error_frame(error: ProtocolError) -> bytes:
    """The frame vLLM sends when a stream fails after its 200 was committed: `data: {"error": ...}`."""
    return data_frame(error.to_json())
