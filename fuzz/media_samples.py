"""Tiny media the request fuzzers put in chat content parts and the fake runtime fetches.

Built once (Pillow for images, the stdlib `wave` module for audio) and cached: a fuzz run sends
thousands of them, so they are a few hundred bytes each and decode in well under a millisecond.
Every image has different pixels, so the oracle can tell which sample a decoded item came from
(`sample_name`) and check that equal samples got equal content hashes and different ones did not.
"""

from __future__ import annotations

import base64
import functools
import io
import wave
from urllib.parse import unquote_to_bytes

from PIL import Image

IMAGE_NAMES = ("png", "png-rgba", "png-p", "jpeg", "gif", "png-1x1", "png-tall")


def _image(name: str) -> bytes:
    """One tiny image whose pixels differ from every other sample's."""
    if name == "png":
        image = Image.new("RGB", (16, 12), (200, 30, 40))
        fmt = "PNG"
    elif name == "png-rgba":
        image = Image.new("RGBA", (10, 10), (0, 0, 255, 90))
        fmt = "PNG"
    elif name == "png-p":
        image = Image.new("RGB", (12, 12), (10, 200, 10)).quantize(4)
        fmt = "PNG"
    elif name == "jpeg":
        image = Image.new("RGB", (12, 10), (255, 255, 0))
        fmt = "JPEG"
    elif name == "gif":
        image = Image.new("RGB", (9, 7), (0, 128, 255)).convert("P")
        fmt = "GIF"
    elif name == "png-1x1":
        image = Image.new("L", (1, 1), 77)
        fmt = "PNG"
    else:  # a strip taller than wide: resized along its short side, then cropped
        image = Image.frombytes("RGB", (2, 30), bytes((i * 37) % 256 for i in range(2 * 30 * 3)))
        fmt = "PNG"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@functools.cache
def images() -> dict[str, bytes]:
    """Sample name -> file bytes."""
    return {name: _image(name) for name in IMAGE_NAMES}


@functools.cache
def wav() -> bytes:
    """10 ms of a 16 kHz mono 16-bit ramp, as a WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(
            b"".join(((i * 300) % 65536 - 32768).to_bytes(2, "little", signed=True) for i in range(160))
        )
    return buffer.getvalue()


def data_url(data: bytes, mime: str | None = "image/png") -> str:
    return f"data:{mime or ''};base64,{base64.b64encode(data).decode('ascii')}"


MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif"}


def mime_of(name: str) -> str:
    return MIME_TYPES[name.split("-", 1)[0]]


@functools.cache
def image_data_urls() -> dict[str, str]:
    """Sample name -> its canonical `data:` URL."""
    return {name: data_url(data, mime_of(name)) for name, data in images().items()}


@functools.cache
def _names_by_bytes() -> dict[bytes, str]:
    return {data: name for name, data in images().items()}


def sample_name(data: bytes) -> str | None:
    """The image sample these bytes are, if any."""
    return _names_by_bytes().get(data)


def data_url_bytes(url: str) -> bytes | None:
    """What a well-formed base64 `data:` URL carries (None for anything else): a lenient reading,
    enough to recognise a sample behind the URL spellings the strategies make."""
    scheme, _, rest = url.partition(":")
    header, comma, payload = rest.partition(",")
    if scheme.strip().lower() != "data" or not comma or not header.lower().rstrip().endswith("base64"):
        return None
    try:
        text = unquote_to_bytes(payload).decode("ascii")
        compact = "".join(text.split())
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (ValueError, UnicodeError):
        return None


EMBEDS_NAMES = ("rows3", "batched4", "nan", "hidden5", "no_rows")


@functools.cache
def embeds() -> dict[str, str]:
    """`image_embeds` values (base64 `torch.save` bytes) by name: 3 rows of 8 (float32), a batch of
    one holding 4 rows (float16), rows with a NaN, rows of 5 columns, and no rows at all. torch is
    imported only when a strategy first draws one (it costs a second or two)."""
    import torch  # noqa: PLC0415 - lazily: most fuzz runs draw no embeddings before it is needed

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "rows3": torch.randn(3, 8, generator=generator),
        "batched4": torch.randn(1, 4, 8, generator=generator).half(),
        "nan": torch.full((2, 8), float("nan")),
        "hidden5": torch.randn(3, 5, generator=generator),
        "no_rows": torch.zeros(0, 8),
    }
    encoded = {}
    for name, tensor in tensors.items():
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        encoded[name] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return encoded
