"""`--speculative-config`: which proposer drafts tokens, and how many, in vLLM's JSON shape.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}

Only the n-gram (prompt lookup) method exists: it needs no draft model. Bad settings raise
ValueError with a message that names the key, so the CLI can show it as a usage error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram",)

# Speculate only while a step has at most this many decoding sequences (vLLM has no such rule;
# see `engine.spec_decode.speculator` for the measurements behind it).
DEFAULT_MAX_DECODING_SEQS = 4
DEFAULT_MAX_STEP_ROWS = 8


_COUNTS = (
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "max_decoding_seqs",
    "max_step_rows",
)


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # k: tokens proposed (and verified) per sequence and step
    prompt_lookup_max: int = 4  # longest suffix n-gram looked up
    prompt_lookup_min: int = 2  # shortest suffix n-gram looked up
    # drafts only while at most this many sequences decode in a step: bigger batches are compute-bound
    # on a CPU, and verifying drafts there costs more than the accepted tokens save
    max_decoding_seqs: int = DEFAULT_MAX_DECODING_SEQS
    # at most this many rows (decodes plus draft tokens) in a step that carries drafts: past ~16 rows
    # the CPU's quantized matmuls leave the GEMV for tiles with a large fixed cost (engine.step_budget)
    max_step_rows: int = DEFAULT_MAX_STEP_ROWS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative config: unknown method {self.method!r}; supported: {', '.join(METHODS)}"
            )
        for name in _COUNTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"speculative config: {name} must be an integer of at least 1, not {value!r}"
                )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative config: prompt_lookup_min ({self.prompt_lookup_min}) is greater than "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )


_KEYS = tuple(f.name for f in fields(SpeculativeConfig))


def parse_speculative_config(
    value: str | Mapping[str, Any] | SpeculativeConfig | None,
) -> SpeculativeConfig | None:
    """A config from JSON text or a mapping (None, "", "null" or {}: speculation off).

    As in vLLM, `num_speculative_tokens` is required, and when only one of the lookup bounds is
    given the other takes its value; with neither, n-grams of 4 down to 2 tokens are looked up.
    """
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"speculative config is not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            "speculative config must be a JSON object such as "
            '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
        )
    if not value:
        return None
    settings = {str(key).replace("-", "_"): item for key, item in value.items()}
    unknown = sorted(set(settings) - set(_KEYS))
    if unknown:
        raise ValueError(
            f"speculative config: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(_KEYS)}"
        )
    if "method" not in settings:
        raise ValueError('speculative config: "method" is required (supported: ngram)')
    if settings["method"] not in METHODS:
        raise ValueError(
            f"speculative config: unknown method {settings['method']!r}; supported: {', '.join(METHODS)}"
        )
    if "num_speculative_tokens" not in settings:
        raise ValueError('speculative config: "num_speculative_tokens" is required')
    low, high = settings.get("prompt_lookup_min"), settings.get("prompt_lookup_max")
    if low is None and high is None:
        settings["prompt_lookup_min"], settings["prompt_lookup_max"] = 2, 4
    elif low is None:
        settings["prompt_lookup_min"] = high
    elif high is None:
        settings["prompt_lookup_max"] = low
    return SpeculativeConfig(**settings)
