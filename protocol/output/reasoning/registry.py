"""The reasoning parsers by name (`--reasoning-parser NAME`), built-in ones and plugins alike."""

from __future__ import annotations

from collections.abc import Callable

from protocol.output.reasoning.base import ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {}


def register_reasoning_parser(name: str) -> Callable[[type[ReasoningParser]], type[ReasoningParser]]:
    """Class decorator: serve the class as reasoning parser `name` (a later registration replaces it)."""

    def register(cls: type[ReasoningParser]) -> type[ReasoningParser]:
        if not cls.name:
            cls.name = name
        REASONING_PARSERS[name] = cls
        return cls

    return register


def reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered as `name`; KeyError naming the known ones, for the startup error."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(REASONING_PARSERS)) or "none"
        raise KeyError(f"unknown reasoning parser {name!r}; known: {known}") from None
