"""What a speech request answers: each window's tokens turned into text, timed segments, and the
response shapes OpenAI documents (json, text, verbose_json, srt, vtt) and vLLM streams.

A Whisper window's output mixes text tokens (ids below `end_of_text`), special tokens and
timestamps (ids from `timestamp_begin`, 0.02 s apart, relative to the window's start). Text is the
text tokens decoded. Segments come from the timestamps: a timestamp opens a segment, the next one
after some text closes it (Whisper writes `<|t0|> text <|t1|><|t1|> text <|t2|>`); text before any
timestamp starts where the last segment ended; a window that ends inside a segment closes it at
the window's end. Times are clamped into the window and made non-decreasing, so subtitles are
well-formed whatever a model emits.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from protocol.media.spec import SpeechSpec
from protocol.responses import UsageInfo
from protocol.tokenizer import Tokenizer
from protocol.transcription_languages import language_name

TIMESTAMP_STEP = 0.02  # seconds between Whisper's timestamp tokens
MEL_FRAMES_PER_SECOND = 100  # a segment's `seek` counts these (Whisper's log-mel hop: 160 samples at 16 kHz)


# ---- response shapes ----


class DurationUsage(msgspec.Struct, kw_only=True):
    """OpenAI's usage of a whisper transcription: the audio's length, in whole seconds, rounded up."""

    type: Literal["duration"] = "duration"
    seconds: int


class TranscriptionResponse(msgspec.Struct, kw_only=True):
    text: str
    usage: DurationUsage


class TranslationResponse(msgspec.Struct, kw_only=True):
    """OpenAI's translation object has the text only."""

    text: str


class TranscriptionSegment(msgspec.Struct, kw_only=True):
    id: int
    seek: int  # the window's start, in 10 ms mel frames
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float  # the window's mean token logprob (0 when the engine sent none)
    compression_ratio: float
    no_speech_prob: float = 0.0


class TranscriptionResponseVerbose(msgspec.Struct, kw_only=True):
    task: Literal["transcribe", "translate"]
    language: str  # the language's English name, as OpenAI reports it
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    usage: DurationUsage | msgspec.UnsetType = msgspec.UNSET  # transcriptions only


class DeltaContent(msgspec.Struct, kw_only=True):
    content: str


class TranscriptionStreamChoice(msgspec.Struct, kw_only=True):
    delta: DeltaContent
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class TranscriptionStreamResponse(msgspec.Struct, kw_only=True):
    """vLLM's stream chunk: `object` is "transcription.chunk" or "translation.chunk"."""

    id: str
    object: str
    created: int
    model: str
    choices: list[TranscriptionStreamChoice]
    usage: UsageInfo | msgspec.UnsetType = msgspec.UNSET


# ---- one window's output ----


@dataclass(slots=True)
class WindowOutput:
    """What the engine has sent for one window so far."""

    index: int
    start: float
    duration: float
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Segment:
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    window: int


def text_ids(token_ids: Sequence[int], spec: SpeechSpec, tokenizer: Tokenizer) -> list[int]:
    """The ids that are text: below `end_of_text` (Whisper's first special) and not special."""
    limit = min(spec.end_of_text, spec.timestamp_begin)
    specials = tokenizer.all_special_ids
    return [token for token in token_ids if token < limit and token not in specials]


def window_text(output: WindowOutput, spec: SpeechSpec, tokenizer: Tokenizer) -> str:
    return tokenizer.decode(text_ids(output.token_ids, spec, tokenizer), skip_special_tokens=True)


def window_segments(output: WindowOutput, spec: SpeechSpec, tokenizer: Tokenizer) -> list[Segment]:
    """The timed segments of one window (see the module docstring for the rules)."""
    window_end = output.start + output.duration
    segments: list[Segment] = []
    opened: float | None = None  # seconds into the window
    opener: list[int] = []
    body: list[int] = []  # the open segment's ids after its opening timestamp
    last_end = 0.0

    def close(end: float, closer: Sequence[int]) -> None:
        nonlocal opened, last_end
        start = opened if opened is not None else last_end
        ids = text_ids(body, spec, tokenizer)
        if ids:
            segments.append(
                Segment(
                    start=output.start + start,
                    end=output.start + end,
                    text=tokenizer.decode(ids, skip_special_tokens=True),
                    tokens=(*opener, *body, *closer),
                    window=output.index,
                )
            )
            last_end = end
        opened = None
        opener.clear()
        body.clear()

    for token in output.token_ids:
        if token >= spec.timestamp_begin:
            time = (token - spec.timestamp_begin) * TIMESTAMP_STEP
            if text_ids(body, spec, tokenizer):
                close(time, (token,))
            else:  # a (new) opening timestamp
                opened = time
                opener[:] = [token]
                body.clear()
        elif token != spec.end_of_text:
            body.append(token)
    if text_ids(body, spec, tokenizer):
        close(output.duration, ())
    return _well_ordered(segments, output.start, window_end)


def _well_ordered(segments: list[Segment], window_start: float, window_end: float) -> list[Segment]:
    """Clamp into the window and make times non-decreasing (a model may emit any timestamp)."""
    ordered = []
    previous_end = window_start
    for segment in segments:
        start = min(max(segment.start, previous_end), window_end)
        end = min(max(segment.end, start), window_end)
        ordered.append(
            Segment(start=start, end=end, text=segment.text, tokens=segment.tokens, window=segment.window)
        )
        previous_end = end
    return ordered


def compression_ratio(text: str) -> float:
    """Whisper's gzip compression ratio of a text (high: repetitive, a sign of a decoding loop)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def average_logprob(output: WindowOutput) -> float:
    return sum(output.logprobs) / len(output.logprobs) if output.logprobs else 0.0


# ---- the response bodies ----


@dataclass(frozen=True, slots=True)
class SpeechResult:
    """Everything a finished request answers from."""

    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    temperature: float
    outputs: Sequence[WindowOutput]
    spec: SpeechSpec
    tokenizer: Tokenizer

    @property
    def text(self) -> str:
        """The windows' texts joined in order, outer whitespace stripped (as OpenAI answers)."""
        return "".join(window_text(output, self.spec, self.tokenizer) for output in self.outputs).strip()

    def segments(self) -> list[TranscriptionSegment]:
        segments = []
        previous_end = 0.0
        for output in self.outputs:
            logprob = round(average_logprob(output), 6)
            for segment in window_segments(output, self.spec, self.tokenizer):
                start, end = max(segment.start, previous_end), max(segment.end, previous_end)
                previous_end = end
                segments.append(
                    TranscriptionSegment(
                        id=len(segments),
                        seek=round(output.start * MEL_FRAMES_PER_SECOND),
                        start=round(start, 3),
                        end=round(end, 3),
                        text=segment.text,
                        tokens=list(segment.tokens),
                        temperature=self.temperature,
                        avg_logprob=logprob,
                        compression_ratio=round(compression_ratio(segment.text), 6),
                    )
                )
        return segments

    def usage(self) -> DurationUsage:
        return DurationUsage(seconds=duration_seconds(self.duration))


def duration_seconds(duration: float) -> int:
    """Whole seconds, rounded up (OpenAI bills a started second)."""
    return max(0, -int(-duration // 1))


def response_body(result: SpeechResult, response_format: str) -> tuple[bytes, bytes]:
    """(content type, body) of a finished request in `response_format`."""
    if response_format == "text":
        return b"text/plain; charset=utf-8", result.text.encode("utf-8")
    if response_format == "srt":
        return b"text/plain; charset=utf-8", srt(result.segments()).encode("utf-8")
    if response_format == "vtt":
        return b"text/vtt; charset=utf-8", vtt(result.segments()).encode("utf-8")
    if response_format == "verbose_json":
        verbose = TranscriptionResponseVerbose(
            task=result.task,
            language=language_name(result.language),
            duration=round(result.duration, 3),
            text=result.text,
            segments=result.segments(),
            usage=result.usage() if result.task == "transcribe" else msgspec.UNSET,
        )
        return b"application/json", msgspec.json.encode(verbose)
    if result.task == "translate":
        return b"application/json", msgspec.json.encode(TranslationResponse(text=result.text))
    return b"application/json", msgspec.json.encode(
        TranscriptionResponse(text=result.text, usage=result.usage())
    )


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cue_text(text: str) -> str:
    """A cue's text on non-empty lines: a blank line would end the cue early; `-->` would read as timing."""
    lines = [line.strip() for line in text.replace("-->", "->").splitlines()]
    return "\n".join(line for line in lines if line) or "..."


def srt(segments: Sequence[TranscriptionSegment]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, the text, a blank line after each."""
    return "".join(
        f"{number}\n{_clock(segment.start, ',')} --> {_clock(segment.end, ',')}\n{_cue_text(segment.text)}\n\n"
        for number, segment in enumerate(segments, 1)
    )


def vtt(segments: Sequence[TranscriptionSegment]) -> str:
    """WebVTT: the `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    cues = (
        f"{_clock(segment.start, '.')} --> {_clock(segment.end, '.')}\n{_cue_text(segment.text)}\n\n"
        for segment in segments
    )
    return "WEBVTT\n\n" + "".join(cues)
