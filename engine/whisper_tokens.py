"""What a Whisper folder says about its tokens: the `SpeechSpec` the core builds prompts from, and
the `WhisperDecoding` settings of the rules every request decodes under (engine.processors.whisper).

Both come from the tokenizer's vocabulary and generation_config.json, whose Whisper keys
transformers reads the same way: `decoder_start_token_id`, `no_timestamps_token_id` (the
timestamps follow it: `<|0.00|>` is the next id), `prev_sot_token_id`, `lang_to_id` ("<|en|>" ->
id) and `task_to_id` for multilingual models (`is_multilingual`), `suppress_tokens`,
`begin_suppress_tokens` and `max_initial_timestamp_index`. Other formats (CTranslate2's
config.json) can hand the same keys in a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.model_config import UnsupportedModelError
from engine.models.whisper import WhisperConfig
from engine.whisper_features import FeatureSettings
from protocol.media.spec import SpeechSpec

TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>, 0.02 s apart


@dataclass(frozen=True)
class WhisperDecoding:
    """The settings of Whisper's decoding rules (transformers' suppress-token processors and
    `WhisperTimeStampLogitsProcessor`)."""

    end_of_text: int
    no_timestamps: int
    timestamp_begin: int
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()  # at the first generated token only
    max_initial_timestamp_index: int | None = None  # the first timestamp is at most this many steps in


def speech_spec(
    vocab: Mapping[str, int],
    generation: Mapping[str, Any],
    config: WhisperConfig,
    features: FeatureSettings,
) -> SpeechSpec:
    """The special tokens and limits the core needs, from the tokenizer's vocabulary (token -> id,
    added tokens included) and generation_config.json; clear errors for a model that lacks them."""

    def token(name: str, key: str | None = None, fallback: int | None = None) -> int:
        value = generation.get(key) if key else None
        value = value[0] if isinstance(value, list) and value else value
        value = value if value is not None else vocab.get(name, fallback)
        if value is None:
            raise UnsupportedModelError(f"this Whisper model has no {name} token")
        return _in_vocab(int(value), name, config)

    no_timestamps = token("<|notimestamps|>", "no_timestamps_token_id")
    timestamp_begin = no_timestamps + 1
    if vocab.get("<|0.00|>", timestamp_begin) != timestamp_begin:
        raise UnsupportedModelError("the tokenizer's <|0.00|> does not follow <|notimestamps|>")
    if timestamp_begin + TIMESTAMPS > config.vocab_size:
        raise UnsupportedModelError(
            f"the vocabulary ({config.vocab_size}) ends before the {TIMESTAMPS} timestamps after id {no_timestamps}"
        )
    lang_to_id = generation.get("lang_to_id") or {}
    multilingual = bool(generation.get("is_multilingual", bool(lang_to_id)))
    if multilingual and not lang_to_id:
        raise UnsupportedModelError("a multilingual Whisper model needs lang_to_id in generation_config.json")
    tasks = generation.get("task_to_id") or {}
    prev = generation.get("prev_sot_token_id", vocab.get("<|startofprev|>"))
    return SpeechSpec(
        sample_rate=features.sampling_rate,
        window_seconds=float(features.chunk_length),
        max_target_tokens=config.max_target_positions,
        start_of_transcript=token(
            "<|startoftranscript|>", "decoder_start_token_id", config.decoder_start_token_id
        ),
        transcribe=_in_vocab(int(tasks["transcribe"]), "<|transcribe|>", config)
        if "transcribe" in tasks
        else token("<|transcribe|>"),
        translate=(
            _in_vocab(int(tasks["translate"]), "<|translate|>", config)
            if "translate" in tasks
            else token("<|translate|>")
        )
        if multilingual
        else None,
        no_timestamps=no_timestamps,
        start_of_prev=None if prev is None else _in_vocab(int(prev), "<|startofprev|>", config),
        timestamp_begin=timestamp_begin,
        end_of_text=token("<|endoftext|>", "eos_token_id", config.eos_token_id),
        languages={
            _language_code(key): _in_vocab(int(value), key, config) for key, value in lang_to_id.items()
        }
        if multilingual
        else {},
    )


def whisper_decoding(
    generation: Mapping[str, Any], speech: SpeechSpec, config: WhisperConfig
) -> WhisperDecoding:
    """The rules' settings from generation_config.json (or config.json's copies of the suppress lists)."""

    def ids(key: str) -> tuple[int, ...]:
        values = tuple(int(i) for i in generation.get(key) or ())
        for value in values:
            _in_vocab(value, f"{key} entry", config)
        return values

    initial = generation.get("max_initial_timestamp_index")
    return WhisperDecoding(
        end_of_text=speech.end_of_text,
        no_timestamps=speech.no_timestamps,
        timestamp_begin=speech.timestamp_begin,
        suppress_tokens=ids("suppress_tokens"),
        begin_suppress_tokens=ids("begin_suppress_tokens"),
        max_initial_timestamp_index=None if initial is None else int(initial),
    )


def _language_code(key: str) -> str:
    """A lang_to_id key's language code: "<|en|>" -> "en"."""
    if not (key.startswith("<|") and key.endswith("|>")):
        raise UnsupportedModelError(f"lang_to_id key {key!r} is not a language token like <|en|>")
    return key[2:-2]


def _in_vocab(value: int, what: str, config: WhisperConfig) -> int:
    if not 0 <= value < config.vocab_size:
        raise UnsupportedModelError(
            f"{what} id {value} is outside the model's vocabulary ({config.vocab_size})"
        )
    return value
