"""Media decoding under fuzz: any bytes, any mutation of a valid file, any data URL is decoded or
refused with a 400 naming the part, never another exception.

Inputs: random bytes (some behind a real format's magic number), valid PNG/JPEG/GIF/WebP/BMP/TIFF,
WAV/MP3/FLAC/Ogg/WebM/M4A and MP4/WebM/GIF files with one to four mutations (truncation, byte
flips, inserted or deleted runs, duplicated slices, size fields overwritten with extreme values),
each fed to all three decoders; data URLs from pieces that are often almost right; `input_audio`
values of any JSON shape. A decoded item must be well formed (its bytes match its shape).

Each property runs `FUZZ_EXAMPLES // 10` examples (200 by default, 5000 under `make fuzz`) and
asserts it did.
"""

from __future__ import annotations

import base64
import math
import struct
from collections import Counter
from collections.abc import Callable

import numpy
from hypothesis import given
from hypothesis import strategies as st

from fuzz import harness
from protocol.errors import ProtocolError
from protocol.media.audio import decode_audio, decode_input_audio
from protocol.media.data_url import parse_data_url
from protocol.media.image import decode_image
from protocol.media.spec import ImageProcessing
from protocol.media.video import decode_video
from tests.media_samples import audio_bytes, image_bytes, random_image, sine, video_bytes

EXAMPLES = max(harness.EXAMPLES // 10, 50)
RUNS: Counter[str] = Counter()
WHERE = "messages[0].content[0]"
PROCESSING = ImageProcessing(shortest_edge=32, crop_height=32, crop_width=32)

_TONE = numpy.stack([sine(16000, 0.2)])
SEEDS = {
    "png": image_bytes(random_image(24, 16, mode="RGBA")),
    "jpeg": image_bytes(random_image(24, 16), "JPEG"),
    "gif": image_bytes(random_image(24, 16).convert("P"), "GIF"),
    "webp": image_bytes(random_image(24, 16), "WEBP"),
    "bmp": image_bytes(random_image(24, 16), "BMP"),
    "tiff": image_bytes(random_image(24, 16, mode="CMYK"), "TIFF"),
    "wav": audio_bytes(_TONE, 16000, "wav"),
    "mp3": audio_bytes(_TONE, 16000, "mp3"),
    "flac": audio_bytes(_TONE, 16000, "flac"),
    "ogg": audio_bytes(numpy.concatenate([_TONE, _TONE]), 16000, "ogg"),
    "webm-audio": audio_bytes(numpy.stack([sine(48000, 0.2)]), 48000, "webm"),
    "m4a": audio_bytes(_TONE, 16000, "m4a"),
    "mp4": video_bytes(6, 32, 24, "mp4"),
    "webm-video": video_bytes(6, 32, 24, "webm"),
    "gif-video": video_bytes(6, 32, 24, "gif"),
}
MAGIC = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WAVE",
    b"ID3\x04",
    b"fLaC",
    b"OggS\x00\x02",
    b"\x1aE\xdf\xa3",
    b"\x00\x00\x00\x18ftypmp42",
    b"BM",
    b"II*\x00",
    b"RIFF\x00\x00\x00\x00WEBP",
]
EXTREMES = [0, 1, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


def check_decoders(data: bytes) -> None:
    """Every decoder either decodes `data` into a well-formed item or refuses it with our 400."""
    decoders: list[tuple[str, Callable[[], object]]] = [
        ("image", lambda: decode_image(data, PROCESSING, where=WHERE)),
        ("audio", lambda: decode_audio(data, 16000, where=WHERE, max_seconds=5)),
        ("video", lambda: decode_video(data, where=WHERE, num_frames=4, max_frames=200)),
    ]
    for kind, decode in decoders:
        try:
            item = decode()
        except ProtocolError as error:
            assert_refusal(error, kind)
            continue
        element = 4 if kind == "audio" else 1
        assert len(item.data) == math.prod(item.shape) * element > 0, (kind, item.shape)
        assert len(item.hash) == 64


def assert_refusal(error: ProtocolError, kind: str | None = None) -> None:
    assert (error.status, error.param) == (400, "messages"), error.message
    assert WHERE in error.message and error.message.startswith("Invalid "), error.message
    if kind:
        assert kind in error.message or "content part" in error.message, error.message


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate", "field"]))
        if op == "truncate":
            del data[at:]
        elif op == "flip":
            data[at : at + 1] = bytes([draw(st.integers(0, 255))])
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "duplicate":
            data[at:at] = data[draw(st.integers(0, max(len(data) - 1, 0))) :][: draw(st.integers(1, 256))]
        else:  # a size or count field set to an extreme, in either byte order and width
            fmt = draw(st.sampled_from([">I", "<I", ">H", "<H"]))
            value = draw(st.sampled_from(EXTREMES)) % (1 << (8 * struct.calcsize(fmt)))
            data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(data)


@harness.fuzz_settings(EXAMPLES)
@given(data=mutated())
def _mutated_files(data: bytes) -> None:
    RUNS["mutated"] += 1
    check_decoders(data)


def test_mutated_media_files_are_decoded_or_refused() -> None:
    _mutated_files()
    assert RUNS["mutated"] >= EXAMPLES


@harness.fuzz_settings(EXAMPLES)
@given(
    data=st.one_of(
        st.binary(max_size=512), st.tuples(st.sampled_from(MAGIC), st.binary(max_size=512)).map(b"".join)
    )
)
def _random_bytes(data: bytes) -> None:
    RUNS["random"] += 1
    check_decoders(data)


def test_random_bytes_are_decoded_or_refused() -> None:
    _random_bytes()
    assert RUNS["random"] >= EXAMPLES


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PAYLOAD_PIECES = st.sampled_from([*_B64, *"=%-_ \t\r\n,;:é\x00", "\ud800", "%2B", "%3D", "%ZZ", "%"])
_PAYLOAD = st.lists(_PAYLOAD_PIECES, max_size=48).map("".join)


@st.composite
def data_urls(draw: st.DrawFn) -> tuple[str, bytes | None]:
    """A data URL, and the bytes it must decode to when it is one built to be valid (else None)."""
    original = draw(st.binary(max_size=48))
    encoded = base64.b64encode(original).decode()
    if draw(st.booleans()):  # valid: MIME case, whitespace and padding as clients vary them
        mime = draw(st.sampled_from(["", "application/octet-stream", "IMAGE/PNG", "image/jpeg"]))
        params = draw(st.sampled_from(["", ";charset=binary", ";name=x.png"]))
        if draw(st.booleans()):
            encoded = encoded.rstrip("=")
        cut = draw(st.integers(0, len(encoded)))
        encoded = encoded[:cut] + draw(st.sampled_from(["", "\n", " ", "\r\n"])) + encoded[cut:]
        flag = draw(st.sampled_from([";base64", ";BASE64", " ; base64"]))
        return f"{draw(st.sampled_from(['data:', 'DATA:']))}{mime}{params}{flag},{encoded}", original
    scheme = draw(st.sampled_from(["data:", "DATA:", "data", "dat:", "", " data:", "http://x/", "data::"]))
    mime = draw(
        st.one_of(
            st.sampled_from(
                [
                    "",
                    "image/png",
                    "audio/wav",
                    "video/mp4",
                    "text/plain",
                    "image",
                    "/",
                    "a/b/c",
                    "image/png ",
                    "x/",
                ]
            ),
            st.text(max_size=12),
        )
    )
    params = draw(
        st.lists(st.sampled_from(["base64", "BASE64", "charset=x", "", " ", "base64 "]), max_size=3)
    )
    comma = draw(st.sampled_from([",", "", ",,"]))
    payload = draw(st.one_of(st.just(encoded), _PAYLOAD))
    return scheme + mime + "".join(f";{p}" for p in params) + comma + payload, None


@harness.fuzz_settings(EXAMPLES)
@given(case=data_urls(), kind=st.sampled_from(["image", "audio", "video"]))
def _data_urls(case: tuple[str, bytes | None], kind: str) -> None:
    RUNS["data_url"] += 1
    url, expected = case
    try:
        mime, data = parse_data_url(url, kind, where=WHERE)  # type: ignore[arg-type]
    except ProtocolError as error:
        # a URL built valid is refused only for a MIME type of another kind
        assert expected is None or "the media type" in error.message, (url, error.message)
        assert_refusal(error)
        return
    assert isinstance(data, bytes) and (mime is None or mime == mime.lower())
    if expected is not None:
        assert data == expected, url


def test_data_urls_are_parsed_or_refused() -> None:
    _data_urls()
    assert RUNS["data_url"] >= EXAMPLES


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
INPUT_AUDIO = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {
            "data": st.one_of(
                _PAYLOAD, st.just(base64.b64encode(SEEDS["wav"]).decode())
            )
        },
        optional={"format": st.one_of(st.sampled_from(["wav", "mp3", "WAV", "exe", ""]), JSON)},
    ),
)


@harness.fuzz_settings(EXAMPLES)
@given(value=INPUT_AUDIO)
def _input_audio(value: object) -> None:
    RUNS["input_audio"] += 1
    try:
        decoded = decode_input_audio(value, 16000, where=WHERE, max_seconds=5)
    except ProtocolError as error:
        assert_refusal(error)
        return
    assert len(decoded.data) == 4 * decoded.shape[0] > 0


def test_input_audio_values_are_decoded_or_refused() -> None:
    _input_audio()
    assert RUNS["input_audio"] >= EXAMPLES
