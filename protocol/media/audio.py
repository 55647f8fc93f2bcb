"""Audio in prompts (and, later, speech-to-text uploads): any common container to float32 mono PCM.

Why PyAV: it binds FFmpeg, so one decoder reads every container and codec clients send (WAV,
FLAC, MP3, Ogg Vorbis/Opus, WebM, M4A/AAC, ...) from memory, and its `AudioResampler` (FFmpeg's
swresample) downmixes and resamples in the same pass. Nothing here touches files or the network:
`av.open` reads a `BytesIO`, only the demuxers of audio containers are allowed (not playlists
such as HLS or concat, which open further URLs), and any further open a demuxer attempts is refused.
PyAV silences FFmpeg's log by default (`av.logging`), so bad input prints nothing.

The result: little-endian float32 samples in [-1, 1] (roughly), mono (the mean of the
channels for stereo), at the model's `sample_rate`. The duration limit is checked while decoding,
so a long file stops early rather than being decoded whole first.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

import av
import msgspec
from av.audio.resampler import AudioResampler

from protocol.errors import ProtocolError
from protocol.media.data_url import decode_base64
from protocol.media.decoding import DECODE_ERRORS, content_hash, invalid, open_container

# FFmpeg demuxer names (as `format_whitelist` matches them) of the audio containers we read.
DEMUXERS = ("wav", "w64", "flac", "mp3", "ogg", "matroska", "mov", "aac", "aiff", "caf")
# A bound on output whatever the caller's limit: a 1 Hz "recording" upsampled to 16 kHz would
# otherwise turn a few MB of input into GBs of samples.
HARD_MAX_SECONDS = 2 * 3600.0
# swresample mixes stereo to mono as (L + R) / sqrt(2) for float output; capping each output
# channel's coefficients at a sum of 1 makes that the mean of the channels, as librosa's `to_mono`
# (vLLM's loader) does. Other layouts get FFmpeg's standard downmix, normalised the same way.
_DOWNMIX = {"rematrix_maxval": "1.0"}
# `input_audio.format` values we accept; the data is sniffed anyway, so this only refuses nonsense.
INPUT_AUDIO_FORMATS = frozenset({"wav", "mp3", "flac", "ogg", "opus", "webm", "m4a", "mp4", "aac", "aiff"})


class DecodedAudio(msgspec.Struct, frozen=True):
    """float32 little-endian mono samples at the requested rate, `shape == (samples,)`."""

    data: bytes
    shape: tuple[int]
    hash: str


def decode_audio(
    data: bytes,
    sample_rate: int,
    *,
    where: str,
    max_seconds: float | None = None,
    param: str | None = "messages",
) -> DecodedAudio:
    """Decode the first audio stream of `data` to mono float32 at `sample_rate`.

    A 400 (naming `where`, with `param`) for empty or non-audio data, a container without an audio
    stream, truncated or corrupt data, audio longer than `max_seconds`, or no samples at all.
    """
    if not data:
        raise invalid("audio", where, "the data is empty.", param)
    limit = min(max_seconds if max_seconds is not None else HARD_MAX_SECONDS, HARD_MAX_SECONDS)
    max_samples = int(limit * sample_rate)
    chunks: list[bytes] = []
    total = 0
    try:
        with open_container(data, DEMUXERS) as container:
            if not container.streams.audio:
                raise invalid("audio", where, "the data holds no audio stream.", param)
            stream = container.streams.audio[0]
            if stream.codec_context is None:
                raise invalid("audio", where, "there is no decoder for its codec.", param)
            for chunk in _mono_chunks(container, stream, sample_rate):
                total += len(chunk) // 4
                if total > max_samples:
                    raise invalid("audio", where, f"it is longer than the limit of {limit:g} s.", param)
                chunks.append(chunk)
    except DECODE_ERRORS:
        raise invalid(
            "audio",
            where,
            "the data is not audio in a supported format, or it is truncated or corrupt.",
            param,
        ) from None
    if not total:
        raise invalid("audio", where, "it holds no audio samples.", param)
    samples = _little_endian(b"".join(chunks))
    shape = (total,)
    return DecodedAudio(
        data=samples, shape=shape, hash=content_hash(f"audio/float32le/{sample_rate}", shape, samples)
    )


def decode_input_audio(
    part_value: object, sample_rate: int, *, where: str, max_seconds: float | None = None
) -> DecodedAudio:
    """An `input_audio` part's value, `{"data": <base64>, "format": "wav" | "mp3" | ...}`, decoded.

    `format` may be left out: the container is recognised from the data, as vLLM (librosa) does.
    """
    if not isinstance(part_value, dict):
        raise _bad_part(where, "'input_audio' must be an object with 'data' and 'format'.")
    encoded = part_value.get("data")
    if not isinstance(encoded, str) or not encoded:
        raise _bad_part(where, "'input_audio.data' must be a non-empty base64 string.")
    fmt = part_value.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in INPUT_AUDIO_FORMATS):
        allowed = ", ".join(sorted(INPUT_AUDIO_FORMATS))
        raise _bad_part(where, f"'input_audio.format' must be one of: {allowed}.")
    data = decode_base64(encoded, where=where, what="input_audio data")
    return decode_audio(data, sample_rate, where=where, max_seconds=max_seconds)


def _mono_chunks(
    container: av.container.InputContainer, stream: av.AudioStream, rate: int
) -> Iterator[bytes]:
    """The stream's samples as packed float32 mono at `rate`, chunk by chunk.

    A new resampler is set up (after flushing the old one) whenever the input's format, layout or
    rate changes mid-stream, which PyAV's resampler refuses and its passthrough would miss.
    """
    resampler: AudioResampler | None = None
    setup: tuple[str, str, int] | None = None
    for packet in container.demux(stream):
        for frame in packet.decode():
            current = (frame.format.name, frame.layout.name, frame.sample_rate)
            if current != setup:
                if resampler is not None:
                    yield from _packed(resampler.resample(None))
                resampler, setup = (
                    AudioResampler(format="flt", layout="mono", rate=rate, options=_DOWNMIX),
                    current,
                )
            yield from _packed(resampler.resample(frame))
    if resampler is not None:
        yield from _packed(resampler.resample(None))


def _packed(frames: list[av.AudioFrame]) -> Iterator[bytes]:
    for frame in frames:
        if frame is None:  # a passthrough resampler hands the flush back as [None]
            continue
        # one packed plane; its buffer may be padded past the samples for alignment
        yield bytes(frame.planes[0])[: frame.samples * 4]


def _little_endian(samples: bytes) -> bytes:
    if sys.byteorder == "little":
        return samples
    swapped = array("f", samples)
    swapped.byteswap()
    return swapped.tobytes()


def _bad_part(where: str, reason: str) -> ProtocolError:
    return ProtocolError(f"Invalid content part {where}: {reason}", param="messages")
