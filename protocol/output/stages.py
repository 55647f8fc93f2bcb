"""The message stages of one chat sample: reasoning parser, then tool parser; text in, deltas out.

Fed the text that survived stop strings (`protocol.calls.sample.Sample`), step by step. Tool calls
are parsed only from the content after the reasoning ends, so a call that arrives in the same
delta as `</think>` is still found. `include_reasoning=False` drops the reasoning;
`parallel_tool_calls=False` keeps only the first call, as vLLM does.
"""

from __future__ import annotations

from protocol.output.deltas import MessageDelta
from protocol.output.reasoning.base import ReasoningParser
from protocol.output.tool_parsers.base import ToolParser


class MessageStages:
    def __init__(
        self,
        reasoning: ReasoningParser | None = None,
        tools: ToolParser | None = None,
        *,
        include_reasoning: bool = True,
        parallel_tool_calls: bool = True,
    ) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.include_reasoning = include_reasoning
        self.parallel_tool_calls = parallel_tool_calls

    def feed(self, text: str) -> MessageDelta:
        if self.reasoning is None:
            return self._tools(text, final=False)
        split = self.reasoning.feed(text)
        return self._reasoning(split.reasoning) + self._tools(split.content, final=False)

    def finish(self) -> MessageDelta:
        if self.reasoning is None:
            return self._tools("", final=True)
        split = self.reasoning.finish()
        return self._reasoning(split.reasoning) + self._tools(split.content, final=True)

    @property
    def called(self) -> bool:
        """Whether a tool call went out (for the finish reason)."""
        return self.tools is not None and self.tools.called

    def _reasoning(self, text: str) -> MessageDelta:
        return MessageDelta(reasoning=text) if text and self.include_reasoning else MessageDelta()

    def _tools(self, text: str, *, final: bool) -> MessageDelta:
        if self.tools is None:
            return MessageDelta(content=text)
        delta = self.tools.feed(text) if text else MessageDelta()
        if final:
            delta = delta + self.tools.finish()
        if not self.parallel_tool_calls and any(call.index > 0 for call in delta.tool_calls):
            delta = MessageDelta(delta.content, delta.reasoning, tuple(c for c in delta.tool_calls if c.index == 0))
        return delta
