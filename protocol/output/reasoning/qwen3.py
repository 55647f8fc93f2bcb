"""Qwen3 reasoning: the model opens `<think>` itself, or answers directly (thinking off).

The output is reasoning only when it begins (after whitespace) with `<think>`; up to `</think>` is
reasoning, after it is content, verbatim. An output that does not begin with `<think>` is all
content, and `reasoning_ended` is True as soon as that is known. A `<think>` never closed is all
reasoning (the model ran out of tokens while thinking).
"""

from __future__ import annotations

from protocol.output.deltas import MessageDelta
from protocol.output.markers import split_at
from protocol.output.reasoning.base import ReasoningParser
from protocol.output.reasoning.registry import register_reasoning_parser

START = "<think>"
END = "</think>"

_OPENING, _THINKING, _CONTENT = range(3)


@register_reasoning_parser("qwen3")
class Qwen3ReasoningParser(ReasoningParser):
    """Reasoning between a leading `<think>` and `</think>`; otherwise everything is content."""

    def __init__(self) -> None:
        self._buffer = ""
        self._state = _OPENING

    def feed(self, text: str) -> MessageDelta:
        """Release what `text` completes; the start is held until it is known whether it is `<think>`."""
        if self._state == _CONTENT:
            return MessageDelta(content=text)
        self._buffer += text
        if self._state == _OPENING:
            start = self._buffer.lstrip()
            if start.startswith(START):
                self._buffer = start[len(START) :]  # the whitespace before the tag belongs to neither
                self._state = _THINKING
            elif START.startswith(start):  # only whitespace yet, or a partial `<think>`
                return MessageDelta()
            else:
                self._state = _CONTENT
                content, self._buffer = self._buffer, ""
                return MessageDelta(content=content)
        reasoning, self._buffer, found = split_at(self._buffer, END)
        if not found:
            return MessageDelta(reasoning=reasoning)
        self._state = _CONTENT
        content, self._buffer = self._buffer, ""
        return MessageDelta(content=content, reasoning=reasoning)

    def finish(self) -> MessageDelta:
        """Release the held text: content if the output never opened `<think>`, else reasoning."""
        held, self._buffer = self._buffer, ""
        if self._state == _OPENING:
            self._state = _CONTENT
            return MessageDelta(content=held)
        return MessageDelta(reasoning=held)

    @property
    def reasoning_ended(self) -> bool:
        return self._state == _CONTENT
