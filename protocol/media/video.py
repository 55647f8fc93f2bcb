"""Videos in prompts: bytes to `num_frames` RGB frames sampled evenly across the first video stream.

Why PyAV: FFmpeg reads the containers and codecs clients send (MP4/H.264, WebM/VP8/VP9/AV1,
Matroska, AVI, MPEG-TS, animated GIF, ...) from memory, and converts frames to RGB itself. As for
audio, only these demuxers are allowed and any further open a demuxer attempts is refused, so a
playlist cannot make the core read files or URLs; PyAV keeps FFmpeg's log silent by default.

Sampling is vLLM's (its OpenCV video loader): with more than `num_frames` frames, the frames at
`numpy.linspace(0, total - 1, num_frames)` (indices truncated to int), else every frame. The total
comes from a first pass that reads packets without decoding them (cheap, and right where the
container's frame count is missing or wrong); the second pass decodes up to the last frame wanted.
Frames keep their size (the first frame's, if it changes mid-stream): resizing is the model's
processor's job, in the engine.

Bounds on untrusted input: `max_pixels_per_frame` is checked on the stream's header and on every
decoded frame, and at most `max_frames` frames are read, so the output is at most
`num_frames * max_pixels_per_frame * 3` bytes and the work is proportional to `max_frames`.
"""

from __future__ import annotations

import av
import msgspec

from protocol.media.decoding import DECODE_ERRORS, content_hash, invalid, open_container

# FFmpeg demuxer names (as `format_whitelist` matches them) of the video containers we read.
DEMUXERS = ("matroska", "mov", "avi", "mpegts", "mpeg", "ogg", "flv", "gif")
MAX_PIXELS_PER_FRAME = 3840 * 2160  # 4K UHD
MAX_FRAMES = 20_000  # about 11 minutes at 30 fps


class DecodedVideo(msgspec.Struct, frozen=True):
    """uint8 RGB frames, row-major `shape == (frames, height, width, 3)`."""

    data: bytes
    shape: tuple[int, int, int, int]
    hash: str


def decode_video(
    data: bytes,
    *,
    where: str,
    num_frames: int = 16,
    max_pixels_per_frame: int = MAX_PIXELS_PER_FRAME,
    max_frames: int = MAX_FRAMES,
) -> DecodedVideo:
    """Decode `num_frames` evenly spaced frames of the first video stream; a 400 naming `where` if bad."""
    if num_frames < 1:
        raise ValueError("num_frames must be at least 1")
    if not data:
        raise invalid("video", where, "the data is empty.")
    try:
        total = _count_frames(data, where, max_pixels_per_frame, max_frames)
        wanted = sample_indices(total, num_frames)
        frames = _decode_frames(data, wanted, where, max_pixels_per_frame) if wanted else []
    except DECODE_ERRORS:
        raise invalid(
            "video", where, "the data is not a video in a supported format, or it is truncated or corrupt."
        ) from None
    if not frames:
        raise invalid("video", where, "it holds no video frames.")
    width, height, _ = frames[0]
    pixels = b"".join(rgb for _, _, rgb in frames)
    shape = (len(frames), height, width, 3)
    return DecodedVideo(data=pixels, shape=shape, hash=content_hash("video/uint8", shape, pixels))


def sample_indices(total: int, num_frames: int) -> list[int]:
    """vLLM's choice: every frame when there are few, else `np.linspace(0, total-1, num_frames).astype(int)`."""
    if total <= num_frames:
        return list(range(total))
    if num_frames == 1:
        return [0]
    step = (total - 1) / (num_frames - 1)
    return [int(i * step) for i in range(num_frames - 1)] + [total - 1]


def _video_stream(container: av.container.InputContainer, where: str, max_pixels: int) -> av.VideoStream:
    if not container.streams.video:
        raise invalid("video", where, "the data holds no video stream.")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise invalid("video", where, "there is no decoder for its codec.")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width and height:  # known from the header: refuse huge frames before decoding any
        _check_size(width, height, where, max_pixels)
    return stream


def _count_frames(data: bytes, where: str, max_pixels: int, max_frames: int) -> int:
    """Packets of the first video stream (one frame each), read without decoding."""
    count = 0
    with open_container(data, DEMUXERS) as container:
        stream = _video_stream(container, where, max_pixels)
        for packet in container.demux(stream):
            if packet.size:  # not the empty flush packet PyAV adds at the end
                count += 1
                if count > max_frames:
                    raise invalid("video", where, f"it has more than {max_frames} frames.")
    return count


def _decode_frames(
    data: bytes, wanted: list[int], where: str, max_pixels: int
) -> list[tuple[int, int, bytes]]:
    """(width, height, rgb24 bytes) of the frames at `wanted` (increasing indices in decoding order).

    Where the packets overstated the frames (a decoder that drops some), the indices past the end
    get the last frame decoded, so the item keeps its frame count.
    """
    picked: list[tuple[int, int, bytes]] = []
    last: av.VideoFrame | None = None
    size: tuple[int, int] | None = None
    with open_container(data, DEMUXERS) as container:
        stream = _video_stream(container, where, max_pixels)
        for index, frame in enumerate(container.decode(stream)):
            _check_size(frame.width, frame.height, where, max_pixels)
            size = size or (frame.width, frame.height)
            last = frame
            if index == wanted[len(picked)]:
                picked.append((*size, _rgb(frame, *size)))
                if len(picked) == len(wanted):
                    return picked
        if last is not None and size is not None:
            picked += [(*size, _rgb(last, *size))] * (len(wanted) - len(picked))
    return picked


def _rgb(frame: av.VideoFrame, width: int, height: int) -> bytes:
    """The frame as packed rgb24 at (width, height), without the rows' alignment padding."""
    rgb = frame.reformat(width=width, height=height, format="rgb24")
    plane = rgb.planes[0]
    row = width * 3
    raw = memoryview(bytes(plane))
    if plane.line_size == row:
        return bytes(raw[: row * height])
    return b"".join(raw[y * plane.line_size : y * plane.line_size + row] for y in range(height))


def _check_size(width: int, height: int, where: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise invalid("video", where, f"its frames have no pixels ({width}x{height}).")
    if width * height > max_pixels:
        raise invalid(
            "video", where, f"its {width}x{height} frames are over the limit of {max_pixels} pixels."
        )
