"""multipart/form-data and the speech routes under fuzz: any body, any mutation of a valid form,
is parsed or refused with a 4xx `ProtocolError`, never another exception; a speech request built
from such a form is answered (a 200 of the format asked, or an OpenAI error below 500).

Inputs: random bytes under random Content-Types (some almost right); valid forms of random parts
(binary files full of CRLFs and boundary-like runs, text fields, repeated names, odd filenames)
that must parse back exactly; the same forms with one to four mutations (truncations, byte flips,
inserted CRLFs, dashes or boundary copies, deleted or duplicated runs); and speech uploads (a short
WAV or garbage, valid and invalid field values, wrong field names) sent to /v1/audio/transcriptions
and /v1/audio/translations of a tiny speech model whose scripted engine answers each window with
random text, timestamp and special tokens, or fails, or sees the client leave.

Each property runs `FUZZ_EXAMPLES // 10` examples (200 by default, 5000 under `make fuzz`) and
asserts it did.
"""

from __future__ import annotations

import io
import itertools
import json
import wave
from collections import Counter

import numpy
from hypothesis import given
from hypothesis import strategies as st

from fuzz import harness
from fuzz.oracle import traceback_leak
from protocol import App, AppConfig, Body, EndResponse, Failed, Generate, StartResponse, Submit, Tokens
from protocol.errors import ProtocolError
from protocol.multipart import FormLimits, parse_form_data
from protocol.outputs import Compute, compute_inline
from protocol.testing import (
    END_OF_TEXT_ID,
    TIMESTAMP_BEGIN_ID,
    TIMESTAMP_COUNT,
    tiny_served_model,
    tiny_speech_model,
)

EXAMPLES = max(harness.EXAMPLES // 10, 50)
RUNS: Counter[str] = Counter()
LIMITS = FormLimits(max_parts=12, max_part_header_bytes=512, max_field_bytes=2048)
BOUNDARY_CHARS = "abcXYZ0189'()+_,-./:=? "


def _wav(seconds: float) -> bytes:
    rate = 16000
    samples = (numpy.sin(numpy.arange(int(rate * seconds)) * 0.07) * 9000).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as sink:
        sink.setnchannels(1)
        sink.setsampwidth(2)
        sink.setframerate(rate)
        sink.writeframes(samples.tobytes())
    return buffer.getvalue()


WAVS = [_wav(0.05), _wav(0.6), _wav(31.0)]  # the last is two windows


@st.composite
def boundaries(draw: st.DrawFn) -> str:
    text = draw(st.text(BOUNDARY_CHARS, min_size=1, max_size=70))
    return text.rstrip(" ") or "b"


def binary_data() -> st.SearchStrategy[bytes]:
    """Bytes rich in what trips parsers: CRLFs, dashes, NULs and boundary-like runs."""
    pieces = st.sampled_from([b"\r\n", b"\r", b"\n", b"--", b"\x00", b"\xff", b"\r\n--", b"--b", b" \t"])
    return st.lists(st.one_of(pieces, st.binary(max_size=40)), max_size=12).map(b"".join)


NAMES = st.sampled_from(["file", "model", "language", "prompt", "x", "timestamp_granularities[]", "é", "a b"])


@st.composite
def forms(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[str, str | None, bytes]], str]:
    """(boundary, body, parts as (name, filename, data), content type) of a valid form."""
    boundary = draw(boundaries())
    parts = draw(
        st.lists(
            st.tuples(
                NAMES, st.one_of(st.none(), st.sampled_from(["a.wav", "", "x y.bin", "ü.mp3"])), binary_data()
            ),
            max_size=6,
        )
    )
    delimiter = b"\r\n--" + boundary.encode()
    body = draw(st.sampled_from([b"", b"preamble\r\n\r\n", b"pre --amble\r\n"]))
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        head = f"Content-Disposition: {disposition}\r\n".encode() + draw(
            st.sampled_from([b"", b"Content-Type: application/octet-stream\r\n"])
        )
        body += (
            b"--"
            + boundary.encode()
            + draw(st.sampled_from([b"", b" ", b"\t "]))
            + b"\r\n"
            + head
            + b"\r\n"
            + data
        )
        body += b"\r\n"
    body += b"--" + boundary.encode() + b"--" + draw(st.sampled_from([b"", b"\r\n", b"\r\nepilogue"]))
    quoted = draw(st.booleans()) or any(char in boundary for char in " ()',/:=?")
    content_type = (
        f'multipart/form-data; boundary="{boundary}"'
        if quoted
        else f"multipart/form-data; boundary={boundary}"
    )
    # a part's data holding the delimiter would end the part early (clients pick boundaries absent
    # from the data); no match can straddle data and the real delimiter, as a boundary has no CR
    clean = all(delimiter not in data for _, _, data in parts)
    return boundary, body if clean else b"", parts if clean else [], content_type


@st.composite
def mutated(draw: st.DrawFn, body: bytes, boundary: str) -> bytes:
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate"]))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            insert = draw(
                st.sampled_from([b"\r\n", b"--", b"\r\n--" + boundary.encode(), b"\n", b'"', b";", b"\x00"])
            )
            data[at:at] = insert
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
    return bytes(data)


def check_parse(content_type: str | bytes, body: bytes):
    try:
        form = parse_form_data(content_type, body, LIMITS)
    except ProtocolError as error:
        assert 400 <= error.status < 500 and error.message, error.message
        assert error.status in (400, 413)
        return None
    assert len(form.parts) <= LIMITS.max_parts
    for part in form.parts:
        assert isinstance(part.name, str) and isinstance(part.data, bytes)
        assert part.is_file or len(part.data) <= LIMITS.max_field_bytes
    return form


@harness.fuzz_settings(EXAMPLES)
@given(case=forms())
def _valid_forms(case) -> None:
    RUNS["valid"] += 1
    _, body, parts, content_type = case
    if not body:
        return
    form = parse_form_data(content_type, body, FormLimits())
    assert [(p.name, p.filename, p.data) for p in form.parts] == parts


def test_valid_forms_parse_back_exactly() -> None:
    _valid_forms()
    assert RUNS["valid"] >= EXAMPLES


@harness.fuzz_settings(EXAMPLES)
@given(data=st.data(), case=forms())
def _mutated_forms(data: st.DataObject, case) -> None:
    RUNS["mutated"] += 1
    boundary, body, _, content_type = case
    check_parse(content_type, data.draw(mutated(body, boundary)))


def test_mutated_forms_are_parsed_or_refused() -> None:
    _mutated_forms()
    assert RUNS["mutated"] >= EXAMPLES


CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "multipart/form-data; boundary=b",
            'multipart/form-data; boundary="b"',
            "multipart/form-data",
            "multipart/form-data; boundary=",
            'multipart/form-data; boundary="b',
            "application/json",
            "",
        ]
    ),
    st.text(max_size=80),
    st.binary(max_size=80),
)


@harness.fuzz_settings(EXAMPLES)
@given(
    content_type=CONTENT_TYPES,
    body=st.one_of(
        binary_data(),
        st.binary(max_size=300),
        binary_data().map(lambda data: b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n" + data),
    ),
)
def _random_bodies(content_type, body: bytes) -> None:
    RUNS["random"] += 1
    check_parse(content_type, body)


def test_random_bodies_are_parsed_or_refused() -> None:
    _random_bodies()
    assert RUNS["random"] >= EXAMPLES


# ---- speech requests over fuzzed forms ----

SPEECH = tiny_speech_model()
ENGLISH = tiny_speech_model(multilingual=False, name="tiny-en")
# (values a client may send, values to refuse), per field
FIELD_VALUES: dict[str, tuple[list[str], list[str]]] = {
    "model": (["tiny-speech-model", "tiny-en", ""], ["tiny-byte-model", "nope"]),
    "language": (["en", "fr", "de", "EN", ""], ["xx"]),
    "prompt": (["", "hello", "x" * 600], ["<|endoftext|>"]),
    "response_format": (["json", "text", "srt", "vtt", "verbose_json"], ["diarized_json"]),
    "temperature": (["0", "0.7"], ["1.5", "nan", "abc"]),
    "timestamp_granularities[]": (["segment"], ["word", "x"]),
    "stream": (["true", "false", "1"], ["maybe"]),
    "stream_include_usage": (["true", "false"], []),
    "stream_continuous_usage_stats": (["true"], []),
    "top_p": (["0.5"], ["0", "2"]),
    "seed": (["1", "-1"], ["99999999999999999999999"]),
    "max_completion_tokens": (["1", "1000"], ["0"]),
    "to_language": (["en"], ["fr"]),
    "unknown": (["x"], []),
}


def make_app() -> App:
    ids = itertools.count(1)
    config = AppConfig(max_audio_upload_bytes=2_000_000, max_audio_upload_seconds=40.0)
    models = [SPEECH, ENGLISH, tiny_served_model()]
    return App(config, models, clock=lambda: 1_700_000_000.0, new_id=lambda: f"fz{next(ids)}")


ONE_IN_TEN = st.sampled_from([False] * 9 + [True])  # (hypothesis favours small integers; this stays 1 in 10)


@st.composite
def speech_forms(draw: st.DrawFn) -> tuple[bytes, bytes]:
    boundary = "fuzzboundary"
    fields = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=6, unique=True))
    parts = []
    for name in fields:
        good, bad = FIELD_VALUES[name]
        values = bad if bad and draw(ONE_IN_TEN) else good
        parts.append((name, draw(st.sampled_from(values)).encode(), None))
    audio = draw(
        st.one_of(
            st.sampled_from(WAVS),
            st.sampled_from(WAVS),
            st.binary(max_size=64),
            st.sampled_from(WAVS).map(lambda w: w[: len(w) // 3]),
        )
    )
    if "stream" not in fields and {"stream_include_usage", "stream_continuous_usage_stats"} & set(fields):
        parts.append(("stream", b"true", None))  # mostly: options without `stream` are a 400
    if "timestamp_granularities[]" in fields and "response_format" not in fields:
        parts.append(("response_format", b"verbose_json", None))
    if not draw(ONE_IN_TEN):
        name = draw(st.sampled_from(["file"] * 18 + ["audio", "File"]))
        parts.insert(draw(st.integers(0, len(parts))), (name, audio, "a.wav"))
    body = b""
    for name, data, filename in parts:
        extra = f'; filename="{filename}"' if filename else ""
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    if draw(ONE_IN_TEN):
        body = draw(mutated(body, boundary))
    multipart = f"multipart/form-data; boundary={boundary}"
    content_type = (
        multipart if not draw(ONE_IN_TEN) else draw(st.sampled_from(["application/json", "text/plain"]))
    )
    return content_type.encode(), body


# what a Whisper engine emits: text, special and timestamp tokens of the model's vocabulary
ENGINE_TOKENS = st.one_of(
    st.integers(0, 255),
    st.sampled_from(sorted(SPEECH.tokenizer.all_special_ids)),
    st.integers(TIMESTAMP_BEGIN_ID, TIMESTAMP_BEGIN_ID + TIMESTAMP_COUNT - 1),
)


def play(outputs, response: dict, call) -> list[Generate]:
    submitted = []
    for output in outputs:
        if isinstance(output, StartResponse):
            assert response["status"] is None, "a second StartResponse"
            response["status"], response["headers"] = output.status, dict(output.headers)
        elif isinstance(output, Body):
            assert response["status"] is not None and not response["ended"]
            response["body"] += output.data
        elif isinstance(output, EndResponse):
            response["ended"] = True
        elif isinstance(output, Compute):  # decoding the upload: a server's worker thread runs it
            submitted += play(call.feed([compute_inline(output)]), response, call)
        else:
            assert isinstance(output, Submit)
            submitted += [command for command in output.commands if isinstance(command, Generate)]
    return submitted


def check_answer(response: dict, sent: bytes, engine_status: int | None) -> None:
    status, body = response["status"], response["body"]
    assert response["ended"] and status is not None
    assert status < 500 or status == engine_status, (status, body[:300])
    assert traceback_leak(body, sent) is None, body[:300]
    content_type = response["headers"].get(b"content-type", b"")
    if status != 200:
        error = json.loads(body)["error"]
        assert error["code"] == status and error["message"]
        return
    if content_type.startswith(b"text/event-stream"):
        frames = [frame for frame in body.decode().split("\n\n") if frame]
        assert frames[-1] == "data: [DONE]"
        for frame in frames[:-1]:
            chunk = json.loads(frame[6:])
            assert "error" in chunk or chunk["object"] in ("transcription.chunk", "translation.chunk")
    elif content_type == b"application/json":
        assert "text" in json.loads(body)
    else:
        body.decode("utf-8")


@harness.fuzz_settings(EXAMPLES)
@given(
    case=speech_forms(),
    path=st.sampled_from(["/v1/audio/transcriptions", "/v1/audio/translations"]),
    data=st.data(),
)
def _speech_requests(case, path: str, data: st.DataObject) -> None:
    RUNS["speech"] += 1
    harness.EXERCISED["speech"] += 1
    content_type, body = case
    call = make_app().handle("POST", path, [(b"content-type", content_type)], body)
    response: dict = {"status": None, "headers": {}, "body": b"", "ended": False}
    running = play(call.start(), response, call)
    engine_status = None
    while running and not response["ended"]:
        action = data.draw(st.sampled_from(["tokens"] * 8 + ["fail", "leave"]), label="engine")
        generate = running[data.draw(st.integers(0, len(running) - 1), label="which")]
        if action == "leave":
            aborts = call.disconnected()
            assert {abort.request_id for abort in aborts} <= {g.request_id for g in running}
            assert call.finished and call.disconnected() == []
            harness.STATUSES[response["status"] or 499] += 1
            return
        if action == "fail":
            engine_status = data.draw(st.sampled_from([400, 500, 503]), label="status")
            events = [Failed(generate.request_id, engine_status, "engine failure")]
        else:
            ids = data.draw(st.lists(ENGINE_TOKENS, max_size=12), label="ids")
            finish = data.draw(st.sampled_from([None, "stop", "stop", "length"]), label="finish")
            if finish == "stop":
                ids.append(END_OF_TEXT_ID)
            events = [
                Tokens(
                    generate.request_id, 0, tuple(ids), len(generate.prompt_token_ids), finish_reason=finish
                )
            ]
            if finish is not None:
                running.remove(generate)
        running += play(call.feed(events), response, call)
        if action == "fail":
            running.clear()
    assert response["ended"], "the call waits although no engine work runs"
    harness.STATUSES[response["status"]] += 1
    check_answer(response, body, engine_status)


def test_speech_requests_are_answered_well() -> None:
    _speech_requests()
    assert RUNS["speech"] >= EXAMPLES
