"""The media fetch exchange between the core and its runtime (values only; the runtime does the IO).

The core yields `protocol.outputs.Fetch(requests)`; the runtime fetches each URL under its limits
(`--allowed-media-domains`, `--allowed-local-media-path`, size and time limits) and feeds one
`MediaFetched` or `MediaFetchFailed` per request back through `Call.feed`.
"""

from __future__ import annotations

import msgspec

from protocol.media.spec import Modality


class MediaRequest(msgspec.Struct, frozen=True):
    """Fetch `url` (http, https or file); `key` matches the answer to the request."""

    key: int
    url: str
    kind: Modality


class MediaFetched(msgspec.Struct, frozen=True):
    key: int
    data: bytes
    content_type: str | None = None  # the server's Content-Type, when it sent one


class MediaFetchFailed(msgspec.Struct, frozen=True):
    """The runtime could not (or may not) fetch the URL; `message` says why, for a 400 naming the part."""

    key: int
    message: str


FetchResult = MediaFetched | MediaFetchFailed
