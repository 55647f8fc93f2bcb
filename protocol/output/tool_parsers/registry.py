"""The tool parsers by name (`--tool-call-parser NAME`), built-in ones and plugins alike.

A plugin (`--tool-parser-plugin FILE`) is a Python file the server executes; it registers its
parser with `@register_tool_parser("name")` (vLLM's equivalent is
`ToolParserManager.register_module`), after which `tool_parser("name")` finds it.
"""

from __future__ import annotations

from collections.abc import Callable

from protocol.output.tool_parsers.base import ToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    """Class decorator: serve the class as tool parser `name` (a later registration replaces it)."""

    def register(cls: type[ToolParser]) -> type[ToolParser]:
        if not cls.name:
            cls.name = name
        TOOL_PARSERS[name] = cls
        return cls

    return register


def tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name`; KeyError naming the known ones, for the startup error."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(TOOL_PARSERS)) or "none"
        raise KeyError(f"unknown tool parser {name!r}; known: {known}") from None
