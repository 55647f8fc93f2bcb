"""Pythonic tool calls (Llama 3.2, Llama 4, ...): the output is a Python list of calls.

`[get_weather(city="Paris", days=3), other(x=[1, 2], y={"a": None})]`, optionally wrapped in
`<|python_start|>` / `<|python_end|>` (Llama 4; `<|python_tag|>` before it is accepted too).
Arguments are keyword arguments with literal values, turned into a JSON object with
`json.dumps(..., ensure_ascii=False)`: None, True and False become null, true and false, tuples and
sets become lists; JSON's own `null`, `true` and `false` written as names are accepted.

An output that is not such a list is content, verbatim. Calls are found by tracking brackets and
string literals (quotes, triple quotes, escapes), so `)` and `,` inside strings are fine. Each call
is released whole (id, name, arguments in one delta) once its closing parenthesis arrives; the
calls that complete within one `feed` are released together at its end, so a list that arrives
whole (the non-streaming result) is all calls or, if any call in it is not a valid literal call,
all content. Text after the list is content (whitespace-only dropped). If a call goes wrong after
calls were released (streaming), the rest of the output is dropped.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from protocol.output.deltas import MessageDelta
from protocol.output.tool_parsers._common import CallParser, Out, grow, skip_whitespace
from protocol.output.tool_parsers.base import ToolSpec, default_call_id
from protocol.output.tool_parsers.registry import register_tool_parser

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
PYTHON_TAG = "<|python_tag|>"

_HEAD = re.compile(r"[ \t\r\n]*(?:([^\W\d]\w*)[ \t\r\n]*(\()?)?")
_IN_CODE = re.compile(r"['\"()\[\]{}]")
_IN_STRING = re.compile(r"['\"\\]")
_CLOSES = {")": "(", "]": "[", "}": "{"}
_JSON_NAMES = {"true": True, "false": False, "null": None}

_START, _HEAD_NEXT, _BODY, _AFTER_CALL, _AFTER_LIST, _TEXT, _DROP = range(7)


def _literal(node: ast.AST) -> Any:
    """The JSON-compatible value of a literal expression; ValueError for anything else."""
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, bool | int | float | str):
            return node.value
    elif isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [_literal(element) for element in node.elts]
    elif isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise ValueError("** in a dict literal")
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    elif isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise ValueError(f"not a literal: {ast.dump(node)[:80]}")


def parse_call(text: str) -> tuple[str, str] | None:
    """(name, JSON arguments) of `name(key=literal, ...)`, or None when `text` is not such a call."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
        return None
    try:
        arguments = {}
        for keyword in call.keywords:
            if keyword.arg is None:  # **kwargs
                return None
            arguments[keyword.arg] = _literal(keyword.value)
        return call.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return None


@register_tool_parser("pythonic")
class PythonicToolParser(CallParser):
    """A Python list of keyword-argument calls making up the output, else plain content."""

    def __init__(
        self, tools: Sequence[ToolSpec] = (), new_id: Callable[[int], str] = default_call_id
    ) -> None:
        super().__init__(tools, new_id)
        self._raw = ""  # the whole output, while no call was released (the content if none is)
        self._state = _START
        self._pending: list[tuple[str, str]] = []  # calls completed in this feed, released at its end
        # the call being scanned: where it starts in the buffer, how far it was scanned, open brackets
        self._call_start = 0
        self._pos = 0
        self._stack: list[str] = []
        self._quote = ""
        self._escape = False

    def feed(self, text: str) -> MessageDelta:
        """Release content, and the calls whose closing parenthesis `text` brings."""
        out = Out()
        if self._state == _TEXT:
            self._content.add(text, out)
        elif self._state != _DROP:
            if not self.called:
                self._raw = grow(self, "_raw", text)
            self._buffer = grow(self, "_buffer", text)
            self._run(out)
            self._release(out)
        return out.delta()

    def _release(self, out: Out) -> None:
        for name, arguments in self._pending:
            out.call(self._calls.start(name, arguments))
            self._content.call_started()
        self._pending.clear()

    def _fail(self, out: Out) -> None:
        """Not a call list: all content if nothing was released, else the rest is dropped."""
        if self.called:
            self._release(out)
            self._state = _DROP
        else:
            self._pending.clear()
            self._state = _TEXT
            self._content.add(self._raw, out)
        self._buffer = self._raw = ""

    def _run(self, out: Out) -> None:
        while True:
            state = self._state
            buffer = self._buffer
            if state == _START:
                pos = skip_whitespace(buffer, 0)
                for tag in (PYTHON_TAG, PYTHON_START):
                    if buffer.startswith(tag, pos):
                        pos = skip_whitespace(buffer, pos + len(tag))
                rest = buffer[pos:]
                if not rest or PYTHON_TAG.startswith(rest) or PYTHON_START.startswith(rest):
                    return
                if rest[0] != "[":
                    self._fail(out)
                    return
                self._buffer, self._state = rest[1:], _HEAD_NEXT
            elif state == _HEAD_NEXT:  # `name(` next
                head = _HEAD.match(buffer)
                assert head is not None
                if head.group(2) is None:
                    if head.end() == len(buffer):
                        return  # more of the name, or the parenthesis, is coming
                    self._fail(out)
                    return
                self._call_start = head.start(1)
                self._pos, self._stack, self._quote, self._escape = head.end(), ["("], "", False
                self._state = _BODY
            elif state == _BODY:
                end = self._scan()
                if end is None:
                    return
                if end < 0:
                    self._fail(out)
                    return
                call = parse_call(buffer[self._call_start : end])
                if call is None:
                    self._fail(out)
                    return
                self._pending.append(call)
                self._buffer, self._state = buffer[end:], _AFTER_CALL
            elif state == _AFTER_CALL:  # `,` and another call, or the list's end
                pos = skip_whitespace(buffer, 0)
                if pos == len(buffer):
                    return
                if buffer[pos] == ",":
                    self._buffer, self._state = buffer[pos + 1 :], _HEAD_NEXT
                elif buffer[pos] == "]":
                    self._buffer, self._state = buffer[pos + 1 :], _AFTER_LIST
                else:
                    self._fail(out)
                    return
            elif state == _AFTER_LIST:  # an optional `<|python_end|>`, then content
                pos = skip_whitespace(buffer, 0)
                if buffer.startswith(PYTHON_END, pos):
                    buffer = buffer[pos + len(PYTHON_END) :]
                elif PYTHON_END.startswith(buffer[pos:]):
                    return
                self._state, self._buffer, self._raw = _TEXT, "", ""
                self._release(out)  # the list is whole and valid; its calls go out before the text after it
                self._content.add(buffer, out)
                return
            else:
                return

    def _scan(self) -> int | None:
        """Scan the call's arguments on: the index after its `)`, None if not there yet, -1 if broken."""
        buffer, pos, stack = self._buffer, self._pos, self._stack
        size = len(buffer)
        while pos < size:
            if self._quote:
                if self._escape:
                    self._escape = False
                    pos += 1
                    continue
                match = _IN_STRING.search(buffer, pos)
                if match is None:
                    pos = size
                    break
                pos = match.start()
                if buffer[pos] == "\\":
                    self._escape = True
                    pos += 1
                elif buffer.startswith(self._quote, pos):
                    pos += len(self._quote)
                    self._quote = ""
                elif self._quote.startswith(buffer[pos:]):
                    break  # maybe the closing triple quote, arriving
                else:
                    pos += 1
                continue
            match = _IN_CODE.search(buffer, pos)
            if match is None:
                pos = size
                break
            pos = match.start()
            char = buffer[pos]
            if char in "'\"":
                if buffer.startswith(char * 3, pos):
                    self._quote = char * 3
                elif (char * 3).startswith(buffer[pos:]):
                    break  # `"` or `""` at the end: a string or a triple quote, not known yet
                else:
                    self._quote = char
                pos += len(self._quote)
            elif char in "([{":
                stack.append(char)
                pos += 1
            else:
                if not stack or stack.pop() != _CLOSES[char]:
                    return -1
                pos += 1
                if not stack:
                    return pos
        self._pos = pos
        return None

    def finish(self) -> MessageDelta:
        """Release the rest: an unfinished list that released nothing is content."""
        out = Out()
        if self._state == _AFTER_LIST:
            self._content.add(self._buffer, out)
        elif self._state not in (_TEXT, _DROP) and not self.called:
            self._content.add(self._raw, out)
        # else: the output ended inside the list after released calls (max_tokens); they stay
        self._state, self._buffer, self._raw = _DROP, "", ""
        self._content.finish(self.called, out)
        return out.delta()

