"""The tool parsers by name (`--tool-call-parser NAME`); plugins register with `@register_tool_parser`."""

from __future__ import annotations

from collections.abc import Callable

from protocol.output.registry import Registry
from protocol.output.tool_parsers.base import ToolParser

TOOL_PARSERS = Registry("tool parser")


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    """Class decorator: serve the class as tool parser `name` (a later registration replaces it)."""
    return TOOL_PARSERS.register(name)


def tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name`; KeyError naming the known ones."""
    return TOOL_PARSERS.lookup(name)
