"""Server-sent events framing for streamed responses (`data: <json>\\n\\n`, then `data: [DONE]`)."""

from __future__ import annotations

from protocol.errors import ProtocolError

SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
)
DONE_FRAME = b"data: [DONE]\n\n"


# Characters that JSON leaves raw inside strings but that Python's `str.splitlines` (and so httpx's
# `aiter_lines`, which many hand-written SSE clients use) treats as line ends: NEL, LINE SEPARATOR,
# PARAGRAPH SEPARATOR. A token's text can hold them; raw, they cut a `data:` line in two for such a
# client. vLLM never sends them raw (its JSON escapes every non-ASCII character), so neither do we.
_LINE_BREAKING = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def data_frame(json_payload: bytes) -> bytes:
    """One SSE event carrying an already-encoded JSON document (which never contains a newline;
    the Unicode line breaks JSON allows raw are escaped here)."""
    for raw, escaped in _LINE_BREAKING:
        if raw in json_payload:
            json_payload = json_payload.replace(raw, escaped)
    return b"data: " + json_payload + b"\n\n"


def error_frame(error: ProtocolError) -> bytes:
    """The frame vLLM sends when a stream fails after its 200 was committed: `data: {"error": ...}`."""
    return data_frame(error.to_json())
