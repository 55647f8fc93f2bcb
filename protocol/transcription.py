"""Speech-to-text requests (`/v1/audio/transcriptions`, `/v1/audio/translations`): the form's
fields read and checked with OpenAI's and vLLM's semantics, and the engine work they ask for.

Field rules (OpenAI's API, vLLM's extras):
- `file` (required): a file part holding the audio, in any container `protocol.media.audio` reads.
- `model`: a served speech model's name; none: the first model serving "transcription".
- `language`: the spoken language as a Whisper code ("en", "fr", ...). English-only models take
  only "en". Absent on a multilingual model: detected from the first 30 s window, as Whisper,
  faster-whisper and OpenAI do (one extra one-token engine step restricted to the language tokens).
- `prompt`: text the model continues from (Whisper's `initial_prompt`): a leading space, the model's
  tokens, the last `max_target_tokens // 2 - 1` kept, after `<|startofprev|>`, in every window.
- `response_format`: json (default), text, verbose_json, srt, vtt.
- `temperature`: 0 (default, greedy) to 1.
- `timestamp_granularities[]`: "segment" (with verbose_json only, as OpenAI requires); "word" is
  refused (word timing needs cross-attention alignment the engine does not compute).
- `stream`, `stream_include_usage`, `stream_continuous_usage_stats` (vLLM): SSE deltas, json/text only.
- vLLM's sampling extras: `top_p`, `top_k`, `min_p`, `seed`, `frequency_penalty`,
  `repetition_penalty`, `presence_penalty`, `max_completion_tokens`.
- translations: `to_language` may only be "en" (Whisper translates into English only).

Unknown fields are ignored, as OpenAI and vLLM (which logs them) do: clients send newer fields
(`include[]`, `chunking_strategy`) to any server. A field given twice (other than the list field) is
a 400: which value was meant is unknowable. A missing `file` is a 400 naming the file parts that
were sent instead (e.g. `audio`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from protocol.engine_api import MediaInput, SamplingParams
from protocol.errors import ProtocolError
from protocol.media.audio import DecodedAudio
from protocol.media.decoding import content_hash
from protocol.media.spec import SpeechSpec
from protocol.model import ServedModel
from protocol.multipart import FormData
from protocol.requests import INT64_MAX, INT64_MIN
from protocol.tokenizer import Tokenizer

SpeechTask = Literal["transcribe", "translate"]
AudioResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
STREAMABLE_FORMATS = frozenset({"json", "text"})
TIMESTAMP_FORMATS = frozenset({"verbose_json", "srt", "vtt"})
GRANULARITIES_FIELD = "timestamp_granularities[]"
# vLLM's `_DEFAULT_SAMPLING_PARAMS` for what neither the request nor the model's generation_config sets
_DEFAULTS: dict[str, Any] = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
_MSGSPEC_PATH = re.compile(r"at `\$\.(.+?)(?:\[\d+\])?`$")


class TranscriptionRequest(msgspec.Struct, kw_only=True, frozen=True):
    """One speech request: its task, the uploaded audio and the form's fields.

    The same struct serves translations (`task == "translate"`), where `timestamp_granularities[]`
    means nothing and `to_language` may only be "en"."""

    task: SpeechTask = "transcribe"
    file: bytes = b""
    filename: str | None = None
    model: str | None = None
    language: str | None = None
    prompt: str = ""
    response_format: AudioResponseFormat = "json"
    temperature: float = 0.0
    timestamp_granularities: list[Literal["segment", "word"]] = msgspec.field(
        default_factory=list, name=GRANULARITIES_FIELD
    )
    stream: bool = False
    stream_include_usage: bool = False
    stream_continuous_usage_stats: bool = False
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    max_completion_tokens: int | None = None
    to_language: str | None = None

    @property
    def needs_timestamps(self) -> bool:
        return self.response_format in TIMESTAMP_FORMATS


# what only the server sets: a form field of these names is ignored like any unknown field
_SERVER_FIELDS = frozenset({"task", "file", "filename"})
_FORM_FIELDS = (
    frozenset(name for name in (field.encode_name for field in msgspec.structs.fields(TranscriptionRequest)))
    - _SERVER_FIELDS
)
_LIST_FIELDS = {GRANULARITIES_FIELD: GRANULARITIES_FIELD, "timestamp_granularities": GRANULARITIES_FIELD}


def read_speech_request(form: FormData, task: SpeechTask) -> TranscriptionRequest:
    """The request a parsed form makes: `file` and the known fields, type-checked (400s)."""
    files = form.get_all("file")
    if not files:
        raise ProtocolError(_missing_file_message(form), param="file")
    if len(files) > 1:
        raise ProtocolError(
            "The form has more than one 'file' part: send one audio file per request.", param="file"
        )
    (upload,) = files
    if not upload.is_file:
        raise ProtocolError(
            "'file' must be a file part (a form part with a filename, as `-F file=@audio.wav` sends it), "
            "not a text field.",
            param="file",
        )
    values: dict[str, Any] = {}
    for part in form.parts:
        name = _LIST_FIELDS.get(part.name, part.name)
        if name not in _FORM_FIELDS:
            continue  # unknown: ignored, as OpenAI and vLLM do
        text = part.text()
        if name in _LIST_FIELDS.values():
            if text:
                values.setdefault(name, []).append(text)
            continue
        if name in values:
            raise ProtocolError(f"The form field '{name}' is given more than once.", param=name)
        if text or name == "prompt":
            values[name] = text  # an empty field is an unset one (HTML forms send every input)
        else:
            values[name] = None
    values = {name: value for name, value in values.items() if value is not None}
    try:
        fields = msgspec.convert(values, TranscriptionRequest, strict=False)
    except msgspec.ValidationError as error:
        raise _field_error(error) from None
    return msgspec.structs.replace(fields, task=task, file=upload.data, filename=upload.filename)


def _missing_file_message(form: FormData) -> str:
    others = [part.name for part in form.parts if part.is_file]
    expected = "The audio must be sent as a multipart/form-data file part named 'file'"
    if others:
        named = ", ".join(f"'{name}'" for name in dict.fromkeys(others))
        return f"{expected}; the form has file parts named {named} instead."
    return f"{expected}; the form has none."


def _field_error(error: msgspec.ValidationError) -> ProtocolError:
    message = str(error)
    match = _MSGSPEC_PATH.search(message)
    field = match.group(1) if match else None
    reason = _MSGSPEC_PATH.sub("", message).strip().rstrip("-").strip()
    if field is None:
        return ProtocolError(f"Invalid form: {reason}.")
    return ProtocolError(f"Invalid value for the form field '{field}': {reason}.", param=field)


# ---- rules that need the model ----


@dataclass(frozen=True, slots=True)
class SpeechOptions:
    """What a checked request asks of the model: the language (None: detect it) and the
    decoder prompt's text part, tokenized."""

    language: str | None
    prompt_ids: tuple[int, ...]
    timestamps: bool


def speech_options(request: TranscriptionRequest, model: ServedModel, spec: SpeechSpec) -> SpeechOptions:
    """Check the request against OpenAI's rules and the model; what the windows' prompts need."""
    _check_format(request)
    if request.task == "translate":
        if spec.translate is None:
            raise ProtocolError(
                f"The model `{model.name}` is English-only and cannot translate; serve a multilingual "
                "Whisper model for /v1/audio/translations.",
                param="model",
            )
        if request.to_language is not None and request.to_language.lower() != "en":
            raise ProtocolError(
                f"Unsupported to_language: '{request.to_language}'. Whisper translates into English only "
                "(to_language 'en').",
                param="to_language",
            )
    return SpeechOptions(
        language=_language(request.language, spec),
        prompt_ids=_prompt_ids(request.prompt, model.tokenizer, spec),
        timestamps=request.needs_timestamps,
    )


def _check_format(request: TranscriptionRequest) -> None:
    if not request.stream and (request.stream_include_usage or request.stream_continuous_usage_stats):
        raise ProtocolError(
            "Stream options can only be defined when `stream=True`.", param="stream_include_usage"
        )
    if request.stream and request.response_format not in STREAMABLE_FORMATS:
        raise ProtocolError(
            f"Streaming answers only response_format 'json' or 'text', not '{request.response_format}'.",
            param="response_format",
        )
    if request.timestamp_granularities:
        if request.task == "translate":
            raise ProtocolError(
                "timestamp_granularities[] is a transcription field.", param=GRANULARITIES_FIELD
            )
        if request.response_format != "verbose_json":
            raise ProtocolError(
                "timestamp_granularities[] needs response_format 'verbose_json'.", param=GRANULARITIES_FIELD
            )
        if "word" in request.timestamp_granularities:
            raise ProtocolError(
                "Word timestamps are not supported; ask for timestamp_granularities[]=segment.",
                param=GRANULARITIES_FIELD,
            )


def _language(requested: str | None, spec: SpeechSpec) -> str | None:
    if not spec.languages:  # English-only
        if requested is not None and requested.lower() != "en":
            raise ProtocolError(
                f"Unsupported language: '{requested}'. This model is English-only: language must be 'en'.",
                param="language",
            )
        return "en"
    if requested is None:
        return None
    code = requested.lower()
    if code not in spec.languages:
        codes = ", ".join(sorted(spec.languages))
        raise ProtocolError(
            f"Unsupported language: '{requested}'. Language should be an ISO-639-1 code the model knows: {codes}.",
            param="language",
        )
    return code


def _prompt_ids(prompt: str, tokenizer: Tokenizer, spec: SpeechSpec) -> tuple[int, ...]:
    """Whisper's `initial_prompt`: `" " + prompt.strip()` tokenized, the last `max/2 - 1` ids kept."""
    text = prompt.strip()
    if not text:
        return ()
    if spec.start_of_prev is None:
        raise ProtocolError("This model takes no prompt.", param="prompt")
    try:
        ids = tokenizer.encode(" " + text, add_special_tokens=False)
    except ValueError as error:  # a tokenizer refusing the text (lone surrogates)
        raise ProtocolError(f"The prompt cannot be tokenized: {error}", param="prompt") from None
    specials = tokenizer.all_special_ids
    if any(token >= spec.end_of_text or token in specials for token in ids):
        raise ProtocolError(
            "The prompt must not contain the model's special tokens (such as <|endoftext|>).", param="prompt"
        )
    keep = spec.max_target_tokens // 2 - 1
    return tuple(ids[-keep:]) if keep > 0 else ()


# ---- the engine work ----


def decoder_prompt(
    spec: SpeechSpec, task: SpeechTask, language: str, options: SpeechOptions
) -> tuple[int, ...]:
    """One window's decoder prompt, as Whisper (and faster-whisper) builds it:

    `[<|startofprev|>, prompt...]` (with a prompt), `<|startoftranscript|>`, then for multilingual
    models the language and the task, then `<|notimestamps|>` unless timestamps are wanted.
    English-only models take no language or task token: they were trained without them.
    """
    ids: list[int] = []
    if options.prompt_ids and spec.start_of_prev is not None:
        ids += [spec.start_of_prev, *options.prompt_ids]
    ids.append(spec.start_of_transcript)
    if spec.languages:
        ids.append(spec.languages[language])
        ids.append(spec.translate if task == "translate" and spec.translate is not None else spec.transcribe)
    if not options.timestamps:
        ids.append(spec.no_timestamps)
    return tuple(ids)


def detection_prompt(spec: SpeechSpec) -> tuple[int, ...]:
    """Language detection's prompt: `<|startoftranscript|>` alone; the next token, restricted to the
    language tokens, is the detected language (Whisper's `detect_language`)."""
    return (spec.start_of_transcript,)


def detection_params(spec: SpeechSpec) -> SamplingParams:
    return SamplingParams(
        max_tokens=1, temperature=0.0, allowed_token_ids=tuple(sorted(spec.languages.values()))
    )


def sampling_params(
    request: TranscriptionRequest, model: ServedModel, spec: SpeechSpec, prompt_len: int
) -> SamplingParams:
    """The windows' sampling, checked as vLLM's `SamplingParams` does (400s naming the field).

    `max_tokens` is what is left of the decoder's positions after the prompt, or the request's
    `max_completion_tokens` if smaller. verbose_json asks for each token's logprob (`avg_logprob`)."""
    defaults = model.generation_defaults
    top_p = float(request.top_p if request.top_p is not None else defaults.get("top_p", _DEFAULTS["top_p"]))
    top_k = int(request.top_k if request.top_k is not None else defaults.get("top_k", _DEFAULTS["top_k"]))
    min_p = float(request.min_p if request.min_p is not None else defaults.get("min_p", _DEFAULTS["min_p"]))
    repetition = float(
        request.repetition_penalty
        if request.repetition_penalty is not None
        else defaults.get("repetition_penalty", _DEFAULTS["repetition_penalty"])
    )
    values = (
        ("temperature", request.temperature),
        ("top_p", top_p),
        ("min_p", min_p),
        ("repetition_penalty", repetition),
        ("frequency_penalty", request.frequency_penalty),
        ("presence_penalty", request.presence_penalty),
    )
    for name, value in values:
        if not math.isfinite(value):
            raise ProtocolError(f"{name} must be a finite number, got {value}.", param=name)
    if not 0.0 <= request.temperature <= 1.0:
        raise ProtocolError(
            f"temperature must be between 0 and 1, got {request.temperature}.", param="temperature"
        )
    if not 0.0 < top_p <= 1.0:
        raise ProtocolError(f"top_p must be in (0, 1], got {top_p}.", param="top_p")
    if top_k < -1:
        raise ProtocolError(f"top_k must be 0 (disable), or at least 1, got {top_k}.", param="top_k")
    if not 0.0 <= min_p <= 1.0:
        raise ProtocolError(f"min_p must be in [0, 1], got {min_p}.", param="min_p")
    if repetition <= 0.0:
        raise ProtocolError(
            f"repetition_penalty must be greater than zero, got {repetition}.", param="repetition_penalty"
        )
    for name, value in (
        ("frequency_penalty", request.frequency_penalty),
        ("presence_penalty", request.presence_penalty),
    ):
        if not -2.0 <= value <= 2.0:
            raise ProtocolError(f"{name} must be in [-2, 2], got {value}.", param=name)
    if request.seed is not None and not INT64_MIN <= request.seed <= INT64_MAX:
        raise ProtocolError(f"seed must be between {INT64_MIN} and {INT64_MAX}.", param="seed")
    max_tokens = spec.max_target_tokens - prompt_len
    if request.max_completion_tokens is not None:
        if request.max_completion_tokens < 1:
            raise ProtocolError(
                f"max_completion_tokens must be at least 1, got {request.max_completion_tokens}.",
                param="max_completion_tokens",
            )
        max_tokens = min(max_tokens, request.max_completion_tokens)
    if max_tokens < 1:
        raise ProtocolError("The prompt leaves no room for the transcript.", param="prompt")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=top_p,
        top_k=0 if top_k == -1 else top_k,
        min_p=min_p,
        repetition_penalty=repetition,
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        seed=request.seed,
        logprobs=0 if request.response_format == "verbose_json" else None,
    )


@dataclass(frozen=True, slots=True)
class AudioWindow:
    """One window of the upload (30 s, the last shorter) and its samples as the engine takes them."""

    index: int
    start: float  # seconds from the start of the audio
    duration: float
    media: MediaInput


def audio_windows(audio: DecodedAudio, spec: SpeechSpec) -> list[AudioWindow]:
    """Split decoded audio into `spec.window_seconds` windows, each its own `MediaInput`
    (float32 LE samples, `offset`/`length` 0: the audio fills no decoder positions, the decoder
    attends to its encoding across; hashed alone, so equal windows share encoder caches)."""
    size = max(1, int(round(spec.window_seconds * spec.sample_rate)))
    samples = audio.shape[0]
    windows = []
    for index, first in enumerate(range(0, samples, size)):
        count = min(size, samples - first)
        data = audio.data[first * 4 : (first + count) * 4]
        shape = (count,)
        media = MediaInput(
            kind="audio",
            hash=content_hash(f"audio/float32le/{spec.sample_rate}", shape, data),
            offset=0,
            length=0,
            data=data,
            shape=shape,
        )
        windows.append(AudioWindow(index, first / spec.sample_rate, count / spec.sample_rate, media))
    return windows


def speech_form_schema(task: SpeechTask) -> dict[str, Any]:
    """The form's JSON schema for /openapi.json, from the struct the fields are read into."""
    schema = msgspec.json.schema(TranscriptionRequest)
    (definition,) = schema.get("$defs", {}).values()
    properties = {
        name: value for name, value in definition["properties"].items() if name not in _SERVER_FIELDS
    }
    if task == "translate":
        properties.pop(GRANULARITIES_FIELD, None)
    else:
        properties.pop("to_language", None)
    file = {
        "type": "string",
        "format": "binary",
        "description": "the audio (wav, mp3, flac, ogg, webm, m4a, ...)",
    }
    return {"type": "object", "properties": {"file": file, **properties}, "required": ["file"]}
