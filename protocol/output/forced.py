"""Tool calls forced by structured output: a named `tool_choice`, or `"required"`.

The engine constrains the output to JSON (`protocol.validation.tool_choice_schema`), so these
parsers read a known shape and stream it as tool-call deltas, as vLLM does:
- named: the whole output is the arguments of the named tool (finish reason stays `stop`);
- required: the output is `[{"name": ..., "parameters": {...}}, ...]`; each element becomes a call
  whose arguments are the raw text of its `parameters` object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from protocol.output.deltas import MessageDelta, ToolCallDelta
from protocol.output.tool_parsers.base import ToolParser, ToolSpec, default_call_id


class NamedToolCall(ToolParser):
    """All output text is the arguments of one call to `function_name`."""

    name = "named"

    def __init__(
        self, function_name: str, tools: Sequence[ToolSpec] = (), new_id: Callable[[int], str] = default_call_id
    ) -> None:
        super().__init__(tools, new_id)
        self.function_name = function_name
        self._started = False

    def feed(self, text: str) -> MessageDelta:
        if not text:
            return MessageDelta()
        return MessageDelta(tool_calls=(self._delta(text),))

    def finish(self) -> MessageDelta:
        return MessageDelta() if self._started else MessageDelta(tool_calls=(self._delta(""),))

    def _delta(self, text: str) -> ToolCallDelta:
        if self._started:
            return ToolCallDelta(0, arguments=text)
        self._started = True
        return ToolCallDelta(0, id=self.new_id(0), name=self.function_name, arguments=text)

    @property
    def called(self) -> bool:
        return self._started


_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:')


class RequiredToolCalls(ToolParser):
    """`[{"name": ..., "parameters": {...}}, ...]`, streamed call by call.

    A scanner tracks JSON strings and nesting depth over the text seen so far: at depth 1 an
    element starts; once its head (`{"name": "...", "parameters": `) is complete the call's first
    delta goes out, then every character of the parameters value as it arrives, until the value
    closes (depth back to 2)."""

    name = "required"

    def __init__(self, tools: Sequence[ToolSpec] = (), new_id: Callable[[int], str] = default_call_id) -> None:
        super().__init__(tools, new_id)
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._element: str | None = None  # text of the current element up to its arguments
        self._in_arguments = False
        self._value_started = False  # the parameters value's first character has arrived
        self._calls = 0

    def feed(self, text: str) -> MessageDelta:
        calls: list[ToolCallDelta] = []
        arguments: list[str] = []
        for char in text:
            self._scan(char, calls, arguments)
        if arguments:
            calls.append(ToolCallDelta(self._calls - 1, arguments="".join(arguments)))
        return MessageDelta(tool_calls=tuple(calls))

    def _scan(self, char: str, calls: list[ToolCallDelta], arguments: list[str]) -> None:
        depth_before = self._depth
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = True
        elif char in "[{":
            self._depth += 1
        elif char in "]}":
            self._depth -= 1
        if self._in_arguments:
            if not self._value_started and char.isspace():
                return  # whitespace before the value is not part of the arguments
            self._value_started = True
            arguments.append(char)
            if self._depth == 2 and depth_before == 3 and not self._in_string:  # the parameters value closed
                self._in_arguments = False
            return
        if depth_before == 1 and self._depth == 2:  # an element opens
            self._element = ""
        if self._element is not None and (self._depth >= 2 or depth_before >= 2):
            self._element += char
            match = _CALL_HEAD.fullmatch(self._element) if self._depth == 2 else None
            if match is not None:
                if arguments:  # the previous call's last fragment goes first
                    calls.append(ToolCallDelta(self._calls - 1, arguments="".join(arguments)))
                    arguments.clear()
                name = json.loads(f'"{match.group(1)}"')
                calls.append(ToolCallDelta(self._calls, id=self.new_id(self._calls), name=name))
                self._calls += 1
                self._in_arguments, self._value_started, self._element = True, False, None

    @property
    def called(self) -> bool:
        return self._calls > 0
