"""Small media files made in memory for the decoder tests and fuzzers: images with Pillow, audio and
video with PyAV, from known content (random pixels, a sine wave, frames of known colours)."""

from __future__ import annotations

import io
import struct
import zlib

import av
import numpy
from av.audio.resampler import AudioResampler
from PIL import Image

# (container, codec) pairs PyAV's FFmpeg can write here, by the name tests use for them
AUDIO_FORMATS = {
    "wav": ("wav", "pcm_s16le"),
    "flac": ("flac", "flac"),
    "mp3": ("mp3", "libmp3lame"),
    "ogg": ("ogg", "vorbis"),
    "opus": ("ogg", "libopus"),
    "webm": ("webm", "libopus"),
    "m4a": ("ipod", "aac"),
}
VIDEO_FORMATS = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "webm": ("webm", "libvpx-vp9", "yuv420p"),
    "avi": ("avi", "mpeg4", "yuv420p"),
    "mkv": ("matroska", "mjpeg", "yuvj420p"),
    "gif": ("gif", "gif", "rgb8"),
}


def image_bytes(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels in `mode` (P: a quantized palette with index 3 transparent)."""
    rng = numpy.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=numpy.uint8)
    gray = rgba[..., 0]
    if mode == "RGB":
        return Image.fromarray(rgba[..., :3])
    if mode == "RGBA":
        rgba[..., 3] = numpy.where(rgba[..., 3] < 64, 0, rgba[..., 3])  # some pixels fully transparent
        return Image.fromarray(rgba, "RGBA")
    if mode == "L":
        return Image.fromarray(gray)
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(gray), Image.fromarray(rgba[..., 3])])
    if mode == "P":
        image = Image.fromarray(rgba[..., :3]).quantize(64)
        image.info["transparency"] = 3
        return image
    if mode == "CMYK":
        return Image.fromarray(rgba, "RGBA").convert("RGB").convert("CMYK")
    if mode == "I;16":
        return Image.fromarray(gray.astype(numpy.uint16) * 257)
    if mode == "1":
        return Image.fromarray(gray).convert("1")
    raise ValueError(mode)


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` (zero or huge), with a tiny valid-looking body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def sine(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 0.5) -> numpy.ndarray:
    t = numpy.arange(int(round(rate * seconds))) / rate
    return (amplitude * numpy.sin(2 * numpy.pi * freq * t)).astype(numpy.float32)


def audio_bytes(channels: numpy.ndarray, rate: int, name: str = "wav") -> bytes:
    """Encode float32 `channels` ([channels, samples], 1 or 2 of them) as `name` (a key of AUDIO_FORMATS)."""
    container_format, codec = AUDIO_FORMATS[name]
    layout = "mono" if channels.shape[0] == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if codec == "vorbis":  # FFmpeg's own Vorbis encoder is marked experimental
            stream.codec_context.options = {"strict": "experimental"}
        context = stream.codec_context
        resampler = AudioResampler(
            format=context.format, layout=layout, rate=rate, frame_size=context.frame_size or 1024
        )
        frame = av.AudioFrame.from_ndarray(numpy.ascontiguousarray(channels), format="fltp", layout=layout)
        frame.sample_rate = rate
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def frame_colour(index: int) -> tuple[int, int, int]:
    """A colour that tells frame `index` apart after lossy coding (red steps of 6)."""
    return (min(255, 6 * index), 128, 64)


def video_bytes(frames: int, width: int = 64, height: int = 48, name: str = "mp4", fps: int = 10) -> bytes:
    """`frames` frames, frame i filled with `frame_colour(i)`, encoded as `name` (a key of VIDEO_FORMATS)."""
    container_format, codec, pixel_format = VIDEO_FORMATS[name]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
        for index in range(frames):
            pixels = numpy.empty((height, width, 3), numpy.uint8)
            pixels[...] = frame_colour(index)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()
