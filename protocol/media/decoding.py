"""What the media decoders share: the one list of library exceptions that mean "this input is
bad", the 400 they raise, the content hash, and the safe way to open a container with PyAV.

Decoding untrusted bytes with Pillow and PyAV (FFmpeg) can fail in many library-specific ways;
each decoder catches `DECODE_ERRORS` around its library calls (and the short loops driving them)
and turns them into a 400 naming the content part. Anything else escapes, as a bug should.
"""

from __future__ import annotations

import hashlib
import io

import av
from av.error import FFmpegError
from PIL import Image

from protocol.errors import ProtocolError

# The exceptions a decoder of untrusted bytes raises on bad input: each one seen while fuzzing
# (fuzz/test_media_fuzz.py, and longer runs over a few hundred thousand mutated and random files),
# none wider. Pillow turns its plugins' struct.error, IndexError, TypeError and EOFError while
# opening into UnidentifiedImageError, and its decoders' IndexError and struct.error while loading
# into OSError, so those never reach us.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    FFmpegError,  # PyAV: every error FFmpeg returns (InvalidDataError, EOFError, ENOMEM on absurd sizes, ...)
    OSError,  # Pillow: UnidentifiedImageError, "image file is truncated", "broken data stream"
    ValueError,  # Pillow: "tile cannot extend outside image" (a header whose tiles lie outside the size)
    SyntaxError,  # Pillow: "broken PNG file" (a chunk's CRC checked while loading), its plugins' convention
    Image.DecompressionBombError,  # Pillow: a header claiming more than twice MAX_IMAGE_PIXELS
)


def content_hash(kind: str, shape: tuple[int, ...], data: bytes) -> str:
    """Hex SHA-256 over what the model sees: equal content gives equal hashes whatever the container.

    `kind` names the item and its sample type (e.g. "image/uint8", "audio/float32le/16000") so that
    equal bytes of different kinds never collide; the shape is part of it for the same reason.
    """
    digest = hashlib.sha256()
    digest.update(f"{kind};{'x'.join(map(str, shape))};".encode())
    digest.update(data)
    return digest.hexdigest()


def invalid(what: str, where: str, reason: str, param: str | None = "messages") -> ProtocolError:
    """The 400 every decoder raises: "Invalid image in messages[0].content[1]: the data is empty."."""
    return ProtocolError(f"Invalid {what} in {where}: {reason}", param=param)


def open_container(data: bytes, demuxers: tuple[str, ...]) -> av.container.InputContainer:
    """PyAV over `data` in memory, with only `demuxers` (FFmpeg names) allowed and no further opens.

    FFmpeg would otherwise pick any demuxer its probe likes, including playlists (HLS, concat)
    that read other files or URLs (an ffconcat list naming `a.wav` reads ./a.wav). The format
    whitelist refuses those before their headers are read; the protocol whitelist ("none" matches
    no protocol) refuses any open a nested demuxer would still attempt. Neither affects reading
    `data` itself, which is PyAV's own in-memory IO, not an FFmpeg protocol.
    """
    options = {"format_whitelist": ",".join(demuxers), "protocol_whitelist": "none"}
    return av.open(io.BytesIO(data), mode="r", container_options=options, metadata_errors="replace")
