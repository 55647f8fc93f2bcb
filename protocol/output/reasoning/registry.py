"""The reasoning parsers by name (`--reasoning-parser NAME`); plugins register with `@register_reasoning_parser`."""

from __future__ import annotations

from collections.abc import Callable

from protocol.output.reasoning.base import ReasoningParser
from protocol.output.registry import Registry

REASONING_PARSERS = Registry("reasoning parser")


def register_reasoning_parser(name: str) -> Callable[[type[ReasoningParser]], type[ReasoningParser]]:
    """Class decorator: serve the class as reasoning parser `name` (a later registration replaces it)."""
    return REASONING_PARSERS.register(name)


def reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered as `name`; KeyError naming the known ones."""
    return REASONING_PARSERS.lookup(name)
