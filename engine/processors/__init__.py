"""Logits processors: the batched, stateful seam between the model's logits and the draw (see base.py)."""

from __future__ import annotations

from engine.processors.allowed import AllowedTokenIds
from engine.processors.bad_words import BadWords
from engine.processors.base import Admission, LogitsPipeline, LogitsProcessor, RowRef
from engine.processors.bias import LogitBias
from engine.processors.min_tokens import MinTokens
from engine.processors.penalties import Penalties


def builtin_processors() -> list[LogitsProcessor]:
    """The request parameters' processors, in vLLM's order: allowed tokens, logit bias, bad words,
    min_tokens, penalties (a grammar mask would go first)."""
    return [AllowedTokenIds(), LogitBias(), BadWords(), MinTokens(), Penalties()]


__all__ = [
    "Admission",
    "AllowedTokenIds",
    "BadWords",
    "LogitBias",
    "LogitsPipeline",
    "LogitsProcessor",
    "MinTokens",
    "Penalties",
    "RowRef",
    "builtin_processors",
]
