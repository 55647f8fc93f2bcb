"""The tool-parser contract: content text in, content and tool-call deltas out, streamed.

A parser is a state machine, one per sample, built with the request's tools and an id factory.
`feed` takes the next piece of content (any chunking) and returns what can be released now;
`finish` releases the rest. Feeding the whole text then calling `finish` is the non-streaming
result, and every chunking of the same text concatenates to it (`protocol.output.deltas.join`).

Delta shapes follow vLLM: a call's first delta carries its `id` and `name` (and no more of either
later); `arguments` fragments concatenate to the call's JSON arguments object.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.output.deltas import MessageDelta


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the request offers: its name and JSON-schema parameters."""

    name: str
    parameters: dict[str, Any] | None = None


def default_call_id(index: int) -> str:
    return f"chatcmpl-tool-{index}"


class ToolParser:
    """Base class: no tool calls, everything is content. Subclasses parse a model's call format."""

    name: ClassVar[str] = ""
    #: False when the format's markers are special tokens the detokenizer must keep (as vLLM's
    #: parsers adjust the request's `skip_special_tokens`).
    skip_special_tokens: ClassVar[bool] = True

    def __init__(self, tools: Sequence[ToolSpec] = (), new_id: Callable[[int], str] = default_call_id) -> None:
        self.tools = tuple(tools)
        self.new_id = new_id

    def feed(self, text: str) -> MessageDelta:
        """Release what `text` adds (only `content` and `tool_calls` are set)."""
        return MessageDelta(content=text)

    def finish(self) -> MessageDelta:
        """The output ended: release what was held back."""
        return MessageDelta()

    @property
    def called(self) -> bool:
        """Whether any tool call was released (the finish reason is then `tool_calls`)."""
        return False
