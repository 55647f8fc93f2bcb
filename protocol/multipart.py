"""`multipart/form-data` bodies (RFC 7578 over RFC 2046's multipart syntax), parsed whole and pure.

The speech-to-text routes take uploads as OpenAI's do: a form with a `file` part (the audio) and
text fields. The shell hands the core the whole body (already capped at `--max-request-body-bytes`),
so this parser works on one `bytes` object: it finds each delimiter with `bytes.find` (C speed,
no per-line Python loop over megabytes of audio), slices each part's content once, and never
looks inside file content, so CRLFs, NULs and boundary-like runs in binary data are safe.

Why not the stdlib `email` parser: it parses line by line in Python (slow on a 25 MB upload), turns
binary content into surrogate-escaped text and back (copies, and a payload that must be re-encoded
to read it), records malformations as silent "defects" instead of failing (a missing closing
boundary yields a truncated part), and applies MIME rules RFC 7578 forbids for forms
(Content-Transfer-Encoding decoding, nested multiparts). `python-multipart` would do, but its
streaming, callback-based API is machinery for bodies the shell has already collected; the syntax
needed here is small enough to own, with errors that say exactly what is wrong.

What is accepted, as RFC 2046 and browsers write it:
- the boundary from `Content-Type: multipart/form-data; boundary=...` (token or quoted string,
  1 to 70 printable ASCII characters, not ending in a space);
- a preamble before the first boundary line and an epilogue after the closing one, both ignored;
- a delimiter is CRLF + `--boundary` followed by optional spaces/tabs and CRLF (another part) or by
  `--` (the end). A `--boundary` run followed by anything else is content, not a delimiter;
- part headers separated by CRLF, ending with an empty line; `Content-Disposition: form-data` with a
  `name` (required) and `filename` or RFC 5987 `filename*` (which wins), quoted strings with
  backslash escapes; an optional `Content-Type`. Other headers are ignored (RFC 7578 §4.7 retires
  Content-Transfer-Encoding; no client sends it).

Every refusal is a `ProtocolError` naming what is wrong: 400 for broken syntax or too many parts,
413 for a text field over its size limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote

from protocol.errors import ProtocolError

MEDIA_TYPE = "multipart/form-data"
MAX_BOUNDARY_LENGTH = 70  # RFC 2046 §5.1.1
_LWSP = b" \t"
_TOKEN_SEPARATORS = frozenset('()<>@,;:\\"/[]?={} \t')


@dataclass(frozen=True, slots=True)
class FormLimits:
    """Bounds on a form's structure (its total size is bounded by the shell already).

    Why these: a form of a handful of fields needs few parts and small headers; unbounded counts
    would let a small body cost much work (thousands of tiny parts), and text fields are read as
    strings whole, so their size is capped well below a file's.
    """

    max_parts: int = 128
    max_part_header_bytes: int = 16 * 1024
    max_field_bytes: int = 1024 * 1024  # a part without a filename (a text field)


DEFAULT_LIMITS = FormLimits()


@dataclass(frozen=True, slots=True)
class FormPart:
    """One part: a text field (`filename` None) or a file (`filename` set, maybe empty)."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None  # the part's media type, lower-cased, parameters dropped

    @property
    def is_file(self) -> bool:
        return self.filename is not None

    def text(self) -> str:
        """The content as UTF-8 text (RFC 7578 §5.1's default); a 400 naming the field otherwise."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(
                f"The form field '{self.name}' is not valid UTF-8 text.", param=self.name
            ) from None


@dataclass(frozen=True, slots=True)
class FormData:
    """The parts of a form, in the order they were sent (repeated names keep every value)."""

    parts: tuple[FormPart, ...]

    def get_all(self, name: str) -> list[FormPart]:
        return [part for part in self.parts if part.name == name]

    def names(self) -> list[str]:
        """Each part's name once, in order of first appearance."""
        return list(dict.fromkeys(part.name for part in self.parts))


def parse_form_data(content_type: bytes | str, body: bytes, limits: FormLimits = DEFAULT_LIMITS) -> FormData:
    """The form in `body`, whose `Content-Type` header value is `content_type`.

    Raises `ProtocolError` (400) when the header is not `multipart/form-data` with a usable
    boundary or the body is not well-formed multipart, and (413) for an oversized text field.
    """
    boundary = form_boundary(content_type)
    return FormData(tuple(_parts(body, boundary, limits)))


def form_boundary(content_type: bytes | str) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type header value (400 when unusable)."""
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    media_type, params = _header_value(text, what="the Content-Type header")
    if media_type.lower() != MEDIA_TYPE:
        raise _bad(f"The Content-Type must be {MEDIA_TYPE}, got '{media_type or text.strip()}'.")
    boundary = params.get("boundary")
    if boundary is None:
        raise _bad(f"The {MEDIA_TYPE} Content-Type has no boundary parameter.")
    if not 1 <= len(boundary) <= MAX_BOUNDARY_LENGTH or boundary.endswith(" "):
        raise _bad(
            f"The multipart boundary must be 1 to {MAX_BOUNDARY_LENGTH} characters and not end in a space "
            f"(RFC 2046), got {len(boundary)} characters."
        )
    if not all(" " <= char <= "~" for char in boundary):
        raise _bad("The multipart boundary may hold printable ASCII characters only (RFC 2046).")
    return boundary.encode("ascii")


# ---- the body ----


def _parts(body: bytes, boundary: bytes, limits: FormLimits) -> Iterator[FormPart]:
    dash_boundary = b"--" + boundary
    delimiter = b"\r\n" + dash_boundary
    if body.startswith(dash_boundary) and _delimiter_kind(body, len(dash_boundary)) is not None:
        position = len(dash_boundary)  # no preamble
    else:
        first = _find_delimiter(body, delimiter, 0)
        if first is None:
            if dash_boundary + b"\n" in body or b"\n" + dash_boundary in body:
                raise _bad("The multipart body's lines must end with CRLF (RFC 2046), not a bare LF.")
            raise _bad(
                "The multipart body holds no boundary line: it does not match the Content-Type's boundary."
            )
        position = first + len(delimiter)
    count = 0
    while True:
        kind = _delimiter_kind(body, position)
        if kind == "close":
            return  # the epilogue, if any, is ignored
        assert kind is not None  # every delimiter found was checked
        position = _after_transport_padding(body, position)
        if count == limits.max_parts:
            raise _bad(f"The form has more than {limits.max_parts} parts.")
        count += 1
        headers, position = _part_headers(body, position, count, limits)
        end = _find_delimiter(body, delimiter, position)
        if end is None:
            raise _bad(
                f"The multipart body ends inside part {count}: the closing boundary line "
                f"'--{boundary.decode()}--' is missing."
            )
        yield _part(headers, body[position:end], count, limits)
        position = end + len(delimiter)


def _delimiter_kind(body: bytes, after: int) -> str | None:
    """What follows a `--boundary` run at `after`: "close" (`--`), "part" (LWSP* CRLF) or None
    (not a delimiter: the run is part of some content)."""
    if body.startswith(b"--", after):
        return "close"
    end = after
    while end < len(body) and body[end] in _LWSP:
        end += 1
    return "part" if body.startswith(b"\r\n", end) else None


def _after_transport_padding(body: bytes, position: int) -> int:
    while body[position] in _LWSP:
        position += 1
    return position + 2  # the CRLF `_delimiter_kind` saw


def _find_delimiter(body: bytes, delimiter: bytes, start: int) -> int | None:
    """The offset of the next CRLF `--boundary` that really is a delimiter, from `start`."""
    while True:
        found = body.find(delimiter, start)
        if found < 0:
            return None
        if _delimiter_kind(body, found + len(delimiter)) is not None:
            return found
        start = found + 1


def _part_headers(body: bytes, position: int, index: int, limits: FormLimits) -> tuple[bytes, int]:
    """The header block of the part at `position` and where its content starts."""
    if body.startswith(b"\r\n", position):
        return b"", position + 2
    bound = position + limits.max_part_header_bytes
    end = body.find(b"\r\n\r\n", position, bound + 4)
    if end < 0:
        if len(body) - position > limits.max_part_header_bytes:
            raise _bad(
                f"The headers of form part {index} are longer than {limits.max_part_header_bytes} bytes."
            )
        raise _bad(f"The headers of form part {index} do not end with an empty line (CRLF CRLF).")
    return body[position:end], end + 4


def _part(headers: bytes, data: bytes, index: int, limits: FormLimits) -> FormPart:
    disposition: str | None = None
    content_type: str | None = None
    for line in headers.split(b"\r\n") if headers else ():
        name, value = _header_line(line, index)
        if name == "content-disposition":
            if disposition is not None:
                raise _bad(f"Form part {index} has more than one Content-Disposition header.")
            disposition = value
        elif name == "content-type":
            if content_type is not None:
                raise _bad(f"Form part {index} has more than one Content-Type header.")
            content_type = value
    if disposition is None:
        raise _bad(f"Form part {index} has no Content-Disposition header (RFC 7578 requires one).")
    kind, params = _header_value(disposition, what=f"the Content-Disposition of form part {index}")
    if kind.lower() != "form-data":
        raise _bad(f"The Content-Disposition of form part {index} must be 'form-data', got '{kind}'.")
    name = params.get("name")
    if name is None:
        raise _bad(f"The Content-Disposition of form part {index} has no name parameter.")
    filename = _extended(params["filename*"]) if "filename*" in params else params.get("filename")
    if filename is None and len(data) > limits.max_field_bytes:
        raise ProtocolError(
            f"The form field '{name}' is larger than {limits.max_field_bytes} bytes, the limit for text "
            "fields; send files as file parts (with a filename).",
            status=413,
            param=name,
        )
    media_type = (
        _header_value(content_type, what=f"the Content-Type of form part {index}")[0] if content_type else ""
    )
    return FormPart(name=name, data=data, filename=filename, content_type=media_type.lower() or None)


def _header_line(line: bytes, index: int) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise _bad(f"Form part {index} has a folded header line (obsolete line folding is not allowed).")
    if any(byte < 0x20 and byte != 0x09 or byte == 0x7F for byte in line):
        raise _bad(
            f"A header of form part {index} holds a control character: header lines must be separated by CRLF."
        )
    raw_name, colon, raw_value = line.partition(b":")
    name = raw_name.decode("latin-1")
    if not colon or not name or any(char in _TOKEN_SEPARATORS or not " " < char <= "~" for char in name):
        raise _bad(f"Form part {index} has a malformed header line (expected 'Name: value').")
    return name.lower(), raw_value.decode("utf-8", errors="replace").strip(" \t")


# ---- header values: `value; name=token; name="quoted"` ----


def _header_value(text: str, *, what: str) -> tuple[str, dict[str, str]]:
    """The main value and the parameters (names lower-cased) of a structured header value."""
    main, _, rest = text.partition(";")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        char = rest[position]
        if char in "; \t":
            position += 1
            continue
        equals = rest.find("=", position)
        semicolon = rest.find(";", position)
        if equals < 0 or 0 <= semicolon < equals:
            raise _bad(f"A parameter of {what} has no value (expected 'name=value').")
        name = rest[position:equals].strip(" \t").lower()
        if not name:
            raise _bad(f"A parameter of {what} has no name.")
        value, position = _parameter_value(rest, equals + 1, what)
        if name in params:
            raise _bad(f"The parameter '{name}' appears more than once in {what}.")
        params[name] = value
    return main.strip(" \t"), params


def _parameter_value(text: str, position: int, what: str) -> tuple[str, int]:
    """A token (up to `;`) or a quoted string with backslash escapes, and the offset after it."""
    while position < len(text) and text[position] in " \t":
        position += 1
    if position >= len(text) or text[position] != '"':
        end = text.find(";", position)
        end = len(text) if end < 0 else end
        return text[position:end].strip(" \t"), end
    chars: list[str] = []
    position += 1
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text):
            chars.append(text[position + 1])
            position += 2
            continue
        if char == '"':
            return "".join(chars), position + 1
        chars.append(char)
        position += 1
    raise _bad(f"A quoted parameter of {what} has no closing quote.")


def _extended(value: str) -> str:
    """An RFC 5987 value, `charset'language'percent-encoded`, decoded (malformed: taken as it is)."""
    charset, quote, rest = value.partition("'")
    _language, quote2, encoded = rest.partition("'")
    if not quote or not quote2:
        return value
    encoding = charset.lower() if charset.lower() in ("utf-8", "iso-8859-1") else "utf-8"
    return unquote(encoded, encoding=encoding, errors="replace")


def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, status=400)
