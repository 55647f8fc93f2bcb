"""`data:` URLs (RFC 2397) in content parts: parsed to a MIME type and bytes, or a 400.

Parsing follows the WHATWG fetch standard's "data: URL processor", which is what browsers (and so
most clients that build these URLs) do:

- `data:[<mediatype>][;base64],<payload>`; the scheme and `;base64` are case-insensitive, and
  parameters such as `;charset=...` or `;name=...` may sit between the MIME type and `;base64`.
- The payload is percent-decoded first. With `;base64` it is then decoded "forgivingly": ASCII
  whitespace (line breaks included) is dropped and the `=` padding may be left out, but any other
  character outside the standard alphabet (`A-Z a-z 0-9 + /`, so no URL-safe `-` `_`) is an
  error, as is a length no padding can fix. Without `;base64` the percent-decoded bytes are the data.
- An absent MIME type is not read as RFC 2397's `text/plain` default: like
  `application/octet-stream`, it means "unknown", and the decoder sniffs the content. A MIME type
  of the wrong kind for the part (`text/plain` in an `image_url`) is refused.
"""

from __future__ import annotations

import binascii
import re
from urllib.parse import unquote_to_bytes

from protocol.errors import ProtocolError
from protocol.media.spec import Modality

# MIME types that may carry each kind: its own top-level type, plus containers named for another
# kind (audio is often served as `video/mp4`, `video/webm` or `application/ogg`).
_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("image/",),
    "audio": ("audio/", "video/", "application/ogg"),
    "video": ("video/", "application/ogg", "image/gif"),
}
_ARTICLE = {"image": "an image", "audio": "an audio", "video": "a video"}
_UNKNOWN = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110's token
_MIME = re.compile(rf"{_TOKEN}/{_TOKEN}")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*")
_WHITESPACE = re.compile(r"[\t\n\f\r ]+")


def parse_data_url(url: str, kind: Modality, *, where: str) -> tuple[str | None, bytes]:
    """`(mime_type, data)` of a `data:` URL in a part of `kind`; mime_type is lower case, None if absent.

    Raises a 400 naming `where` for a malformed URL, bad base64, or a MIME type of another kind.
    """
    scheme, colon, rest = url.partition(":")
    if not colon or scheme.strip().lower() != "data":
        raise _bad(where, "it does not start with 'data:'.")
    header, comma, payload = rest.partition(",")
    if not comma:
        raise _bad(where, "there is no ',' before the data.")
    params = [param.strip() for param in header.split(";")]
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    mime = params[0].lower()
    if mime and not _MIME.fullmatch(mime):
        raise _bad(where, f"{params[0][:64]!r} is not a MIME type.")
    check_media_type(mime, kind, where=where)
    try:
        raw = unquote_to_bytes(payload.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        raise _bad(where, "the data holds a character that is not valid Unicode.") from None
    data = decode_base64(raw, where=where, what="data URL") if is_base64 else raw
    return (mime or None), data


def check_media_type(mime: str | None, kind: Modality, *, where: str) -> None:
    """Refuse a MIME type (a data URL's or a server's Content-Type) naming another kind of media.

    Parameters (`; charset=...`) are ignored; an absent or octet-stream type passes (to be sniffed).
    """
    essence = (mime or "").split(";", 1)[0].strip().lower()
    if essence in _UNKNOWN or essence.startswith(_KINDS[kind]):
        return
    raise ProtocolError(
        f"Invalid {kind} in {where}: the media type {essence[:64]!r} is not {_ARTICLE[kind]} type.",
        param="messages",
    )


def decode_base64(text: str | bytes, *, where: str, what: str = "base64 data") -> bytes:
    """Forgiving base64 (WHATWG): whitespace dropped, padding optional, nothing else outside the alphabet."""
    if isinstance(text, str):
        if not text.isascii():
            raise _bad(where, "the base64 data holds a non-ASCII character.", what)
        text = text.encode("ascii")
    compact = _WHITESPACE.sub("", text.decode("ascii", "replace"))
    if len(compact) % 4 == 0 and compact.endswith("="):
        compact = compact[:-2] if compact.endswith("==") else compact[:-1]
    if not _BASE64.fullmatch(compact):
        raise _bad(where, "the base64 data holds a character outside the base64 alphabet.", what)
    if len(compact) % 4 == 1:
        raise _bad(where, "the base64 data has a length no padding can fix.", what)
    try:
        return binascii.a2b_base64(compact + "=" * (-len(compact) % 4), strict_mode=True)
    except binascii.Error:  # not expected after the checks above; still a 400, never a 500
        raise _bad(where, "the base64 data is malformed.", what) from None


def _bad(where: str, reason: str, what: str = "data URL") -> ProtocolError:
    return ProtocolError(f"Invalid {what} in {where}: {reason}", param="messages")
