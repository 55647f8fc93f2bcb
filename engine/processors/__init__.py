"""Logits processors: the batched, stateful seam between the model's logits and the draw (see base.py)."""

from __future__ import annotations

from engine.processors.allowed import AllowedTokenIds
from engine.processors.bad_words import BadWords
from engine.processors.base import Admission, LogitsPipeline, LogitsProcessor, RowRef
from engine.processors.bias import LogitBias
from engine.processors.grammar import GrammarMask
from engine.processors.min_tokens import MinTokens
from engine.processors.penalties import Penalties
from engine.structured import GuideCompiler


def builtin_processors(guides: GuideCompiler | None = None) -> list[LogitsProcessor]:
    """The request parameters' processors, in vLLM's order: the grammar mask of structured output
    (when the engine compiles guides), allowed tokens, logit bias, bad words, min_tokens, penalties."""
    grammar: list[LogitsProcessor] = [GrammarMask(guides)] if guides is not None else []
    return [*grammar, AllowedTokenIds(), LogitBias(), BadWords(), MinTokens(), Penalties()]


__all__ = [
    "Admission",
    "AllowedTokenIds",
    "BadWords",
    "GrammarMask",
    "LogitBias",
    "LogitsPipeline",
    "LogitsProcessor",
    "MinTokens",
    "Penalties",
    "RowRef",
    "builtin_processors",
]
