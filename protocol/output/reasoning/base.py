"""The reasoning-parser contract: model text in, (reasoning, content) deltas out, streamed.

A parser is a small state machine, one per sample. `feed` takes the next piece of text (any
chunking: a character, a token, the whole output) and returns what can be released now; `finish`
releases what was held back (a partial tag at the end). Feeding the whole text then calling
`finish` is the non-streaming result, and every chunking of the same text concatenates to it.
"""

from __future__ import annotations

from typing import ClassVar

from protocol.output.deltas import MessageDelta


class ReasoningParser:
    """Base class: everything is content. Subclasses split off the reasoning."""

    name: ClassVar[str] = ""

    def feed(self, text: str) -> MessageDelta:
        """Release what `text` adds (only `reasoning` and `content` are set)."""
        return MessageDelta(content=text)

    def finish(self) -> MessageDelta:
        """The output ended: release what was held back."""
        return MessageDelta()

    @property
    def reasoning_ended(self) -> bool:
        """True once the text after this point is content (tool calls are parsed from then on)."""
        return True
