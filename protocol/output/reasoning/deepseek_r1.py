"""DeepSeek-R1 reasoning: the chat template opens `<think>`, so the output starts in reasoning.

An optional `<think>` at the very start of the output is dropped (some R1 versions repeat it);
everything up to `</think>` is reasoning and everything after it is content, verbatim. An output
that never closes `</think>` is all reasoning (vLLM does the same).
"""

from __future__ import annotations

from protocol.output.deltas import MessageDelta
from protocol.output.markers import split_at
from protocol.output.reasoning.base import ReasoningParser
from protocol.output.reasoning.registry import register_reasoning_parser

START = "<think>"
END = "</think>"


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ReasoningParser):
    """Reasoning until `</think>`, content after it."""

    def __init__(self) -> None:
        self._buffer = ""
        self._opening = True  # a leading `<think>` may still be arriving
        self._ended = False

    def feed(self, text: str) -> MessageDelta:
        """Release the reasoning and content `text` completes (a partial tag is held back)."""
        if self._ended:
            return MessageDelta(content=text)
        self._buffer += text
        if self._opening:
            if self._buffer.startswith(START):
                self._buffer = self._buffer[len(START) :]
            elif START.startswith(self._buffer):
                return MessageDelta()
            self._opening = False
        reasoning, self._buffer, found = split_at(self._buffer, END)
        if not found:
            return MessageDelta(reasoning=reasoning)
        self._ended = True
        content, self._buffer = self._buffer, ""
        return MessageDelta(content=content, reasoning=reasoning)

    def finish(self) -> MessageDelta:
        """Held text (a partial tag) was reasoning after all."""
        held, self._buffer = self._buffer, ""
        return MessageDelta(reasoning=held)

    @property
    def reasoning_ended(self) -> bool:
        return self._ended
