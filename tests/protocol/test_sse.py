"""SSE framing as clients parse it: one `data:` line per event, blank-line separated, `[DONE]` last."""

import json

from protocol.errors import ProtocolError
from protocol.sse import DONE_FRAME, SSE_HEADERS, data_frame, error_frame


def test_data_frame_wraps_one_json_document():
    frame = data_frame(b'{"a":"x\\ny"}')
    assert frame == b'data: {"a":"x\\ny"}\n\n'
    assert json.loads(frame.removeprefix(b"data: ")) == {"a": "x\ny"}


def test_done_frame():
    assert DONE_FRAME == b"data: [DONE]\n\n"


def test_error_frame_is_openai_shaped():
    frame = error_frame(ProtocolError("engine died", status=500))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {
        "error": {"message": "engine died", "type": "InternalServerError", "param": None, "code": 500}
    }


def test_headers_declare_an_event_stream():
    assert dict(SSE_HEADERS)[b"content-type"].startswith(b"text/event-stream")


def test_unicode_line_breaks_in_text_do_not_split_the_data_line():
    """httpx's `aiter_lines` (str.splitlines) ends lines at NEL, U+2028 and U+2029 too: a token's
    text holding one must not cut the event in two for such a client."""
    import msgspec

    text = "a\x85b\u2028c\u2029d é"
    frame = data_frame(msgspec.json.encode({"choices": [{"text": text}]}))
    lines = frame.decode().splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:]) == {"choices": [{"text": text}]}
