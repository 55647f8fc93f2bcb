"""multipart/form-data parsing: what clients send parses to the parts they meant; anything
malformed is a 4xx naming what is wrong."""

from __future__ import annotations

import os

import httpx
import pytest

from protocol.errors import ProtocolError
from protocol.multipart import FormLimits, FormPart, form_boundary, parse_form_data

B = "sansllm-boundary"
CT = f"multipart/form-data; boundary={B}"


def part(name: str, data: bytes | str, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    headers = f"Content-Disposition: {disposition}\r\n" + (
        f"Content-Type: {content_type}\r\n" if content_type else ""
    )
    return headers.encode() + b"\r\n" + (data.encode() if isinstance(data, str) else data)


def body(*parts: bytes, boundary: str = B, preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    delimiter = f"--{boundary}".encode()
    out = preamble + (b"\r\n" if preamble else b"")
    for item in parts:
        out += delimiter + b"\r\n" + item + b"\r\n"
    return out + delimiter + b"--" + epilogue


def refusal(content_type: str | bytes, data: bytes, limits: FormLimits = FormLimits()) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_form_data(content_type, data, limits)
    assert 400 <= caught.value.status < 500
    return caught.value


# ---- what real clients send ----


def test_httpx_form_with_a_binary_file_and_repeated_fields_parses_back():
    """httpx (the openai client's transport) writes the form; every part comes back as sent."""
    audio = (
        bytes(range(256)) * 50 + b"\r\n--" + B.encode() + b"\r\n\r\n\x00"
    )  # CRLFs, NULs, boundary-like text
    request = httpx.Request(
        "POST",
        "http://x/v1/audio/transcriptions",
        files={"file": ("speech.wav", audio, "audio/wav")},
        data={
            "model": "whisper",
            "timestamp_granularities[]": ["segment", "word"],
            "prompt": "héllo\r\nworld",
        },
    )
    form = parse_form_data(request.headers["content-type"], request.read())
    assert form.names() == ["model", "timestamp_granularities[]", "prompt", "file"]
    (file,) = form.get_all("file")
    assert (
        file.data == audio
        and file.filename == "speech.wav"
        and file.content_type == "audio/wav"
        and file.is_file
    )
    assert [p.text() for p in form.get_all("timestamp_granularities[]")] == ["segment", "word"]
    assert form.get_all("prompt")[0].text() == "héllo\r\nworld"
    assert not form.get_all("model")[0].is_file


def test_random_binary_files_survive_byte_for_byte():
    for size in (0, 1, 2, 3, 4096, 100_003):
        data = os.urandom(size)
        form = parse_form_data(CT, body(part("file", data, "a.bin", "application/octet-stream")))
        assert form.parts[0].data == data


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ('multipart/form-data; boundary="quoted boundary:="', b"quoted boundary:="),
        ("Multipart/Form-Data;boundary=abc", b"abc"),
        ("multipart/form-data; charset=utf-8; boundary=abc", b"abc"),
        ("multipart/form-data; boundary=abc ; x=y", b"abc"),
        ('multipart/form-data; boundary="a\\"b"', b'a"b'),
    ],
)
def test_boundary_is_read_quoted_or_not(content_type, boundary):
    assert form_boundary(content_type) == boundary


def test_preamble_epilogue_and_transport_padding_are_ignored():
    data = (
        b"this is a preamble\r\nwith --lines\r\n"
        + f"--{B}  \t\r\n".encode()
        + part("a", "1")
        + f"\r\n--{B}\r\n".encode()
        + part("b", "2")
        + f"\r\n--{B}--\r\nepilogue --{B}\r\n garbage".encode()
    )
    form = parse_form_data(CT, data)
    assert [(p.name, p.data) for p in form.parts] == [("a", b"1"), ("b", b"2")]


def test_boundary_runs_inside_content_are_content_unless_they_are_a_delimiter():
    tricky = f"x--{B}\r\n--{B}x\r\n--{B}-\r\n\n--{B}\r\n".encode()  # never CRLF--boundary(CRLF|--)
    form = parse_form_data(CT, body(part("file", tricky, "t.bin")))
    assert form.parts[0].data == tricky


def test_a_part_without_headers_or_with_empty_content():
    data = f"--{B}\r\n".encode() + part("empty", b"") + f"\r\n--{B}--".encode()
    assert parse_form_data(CT, data).parts == (FormPart(name="empty", data=b""),)
    assert parse_form_data(CT, f"--{B}--\r\n".encode()).parts == ()  # a form with no parts


def test_filename_forms_and_header_spelling():
    data = body(
        b'content-disposition: FORM-DATA; NAME=plain; filename=""\r\n\r\nx',
        b'Content-Disposition: form-data; name="star"; filename="fallback.wav"; filename*=UTF-8\'\'%E2%82%AC.wav\r\n\r\ny',
        b'Content-Disposition: form-data; name="esc\\"aped"; filename="C:\\\\a.wav"\r\nX-Other: 1\r\n\r\nz',
        b'Content-Disposition: form-data; name="ct"\r\nContent-Type: Text/Plain; charset=utf-8\r\n\r\nw',
    )
    plain, star, escaped, typed = parse_form_data(CT, data).parts
    assert plain.name == "plain" and plain.filename == "" and plain.is_file  # an empty file input
    assert star.filename == "€.wav"
    assert escaped.name == 'esc"aped' and escaped.filename == "C:\\a.wav"
    assert typed.content_type == "text/plain" and not typed.is_file


def test_duplicate_names_keep_every_value_in_order():
    form = parse_form_data(CT, body(part("x", "1"), part("y", "a"), part("x", "2"), part("x", "3")))
    assert [p.data for p in form.get_all("x")] == [b"1", b"2", b"3"]
    assert form.names() == ["x", "y"]


# ---- refusals ----


@pytest.mark.parametrize(
    ("content_type", "words"),
    [
        ("application/json", "must be multipart/form-data"),
        ("multipart/mixed; boundary=abc", "must be multipart/form-data"),
        ("multipart/form-data", "no boundary"),
        ("multipart/form-data; boundary=", "1 to 70"),
        ("multipart/form-data; boundary=" + "a" * 71, "1 to 70"),
        ('multipart/form-data; boundary="ends in space "', "not end in a space"),
        ("multipart/form-data; boundary=caf\xe9", "printable ASCII"),
        ('multipart/form-data; boundary="abc', "no closing quote"),
        ("multipart/form-data; boundary", "has no value"),
        ("multipart/form-data; boundary=a; boundary=b", "more than once"),
        ("", "must be multipart/form-data"),
    ],
)
def test_bad_content_types(content_type, words):
    assert words in refusal(content_type, body(part("a", "1"))).message


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "no boundary line"),
        (b"--other\r\n" + part("a", "1") + b"\r\n--other--", "no boundary line"),
        (body(part("a", "1"))[: -len(f"--{B}--\r\n") - 2], "closing boundary line"),  # cut before the end
        (f"--{B}\r\n".encode() + part("a", "1"), "closing boundary line"),  # no final boundary
        (f"--{B}\r\n".encode(), "do not end with an empty line"),
        (f"--{B}\r\nContent-Disposition: form-data; name=a\r\n".encode(), "do not end with an empty line"),
        (body(b"Content-Type: text/plain\r\n\r\nx"), "no Content-Disposition"),
        (body(b"Content-Disposition: attachment; name=a\r\n\r\nx"), "must be 'form-data'"),
        (body(b"Content-Disposition: form-data; filename=a\r\n\r\nx"), "no name parameter"),
        (body(b"Content-Disposition: form-data; name=a\r\nContent-Disposition: form-data; name=b\r\n\r\nx"), "more than one Content-Disposition"),
        (body(b"Content-Disposition: form-data; name=a\r\nContent-Type: a\r\nContent-Type: b\r\n\r\nx"), "more than one Content-Type"),
        (body(b"Content-Disposition: form-data;\r\n name=a\r\n\r\nx"), "folded header"),
        (body(b"Content-Disposition: form-data; name=a\nContent-Type: text/plain\r\n\r\nx"), "control character"),
        (body(b"Content-Disposition form-data; name=a\r\n\r\nx"), "malformed header"),
        (body(b"Bad Name: x\r\nContent-Disposition: form-data; name=a\r\n\r\nx"), "malformed header"),
        (body(b'Content-Disposition: form-data; name="a\r\n\r\nx'), "no closing quote"),
        (body(b"Content-Disposition: form-data; =a\r\n\r\nx"), "has no name"),
        (body(b"Content-Disposition: form-data; name=a; name=b\r\n\r\nx"), "more than once"),
        (body(part("a", b"\xff\xfe")), None),  # bytes are fine; only `text()` minds UTF-8
    ],
)  # fmt: skip
def test_malformed_bodies_are_400s_naming_the_fault(data, words):
    if words is None:
        assert parse_form_data(CT, data).parts[0].data == b"\xff\xfe"
        return
    error = refusal(CT, data)
    assert error.status == 400 and words in error.message, error.message


def test_lf_only_line_endings_are_refused_with_a_hint():
    data = body(part("a", "1")).replace(b"\r\n", b"\n")
    assert "must end with CRLF" in refusal(CT, data).message


def test_limits():
    limits = FormLimits(max_parts=3, max_part_header_bytes=100, max_field_bytes=10)
    assert len(parse_form_data(CT, body(*[part("a", "1")] * 3), limits).parts) == 3
    assert "more than 3 parts" in refusal(CT, body(*[part("a", "1")] * 4), limits).message
    long_header = b"Content-Disposition: form-data; name=a\r\nX-Long: " + b"x" * 100 + b"\r\n\r\nv"
    assert "longer than 100 bytes" in refusal(CT, body(long_header), limits).message
    too_big = refusal(CT, body(part("prompt", "x" * 11)), limits)
    assert too_big.status == 413 and "'prompt'" in too_big.message and too_big.param == "prompt"
    assert parse_form_data(CT, body(part("file", b"x" * 1000, "a.wav")), limits).parts[0].data == b"x" * 1000


def test_text_of_a_non_utf8_field_is_a_400_naming_it():
    (field,) = parse_form_data(CT, body(part("language", b"\xffen"))).parts
    with pytest.raises(ProtocolError) as caught:
        field.text()
    assert caught.value.status == 400 and "'language'" in caught.value.message
