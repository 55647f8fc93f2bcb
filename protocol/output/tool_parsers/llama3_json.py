"""Llama 3.1 / 3.2 JSON tool calls: the whole output is `{"name": "f", "parameters": {...}}`.

The output may begin with `<|python_tag|>` (kept when special tokens are, stripped otherwise: both
are accepted) and may hold several calls separated by `;`. "arguments" is accepted for
"parameters"; an object without either, or without a string "name", is no call. An output that
does not begin (after whitespace and the tag) with `{` is all content, verbatim; text after the
calls is content too (whitespace-only dropped). Arguments stream as the model's raw JSON text.

An object that is no call is content when nothing of it was released: if it is the first, the
whole output is content (as the non-streaming result always has it when the first object is not
a call); after released calls, that object and the rest. A call whose JSON breaks after it was
released (streaming only) cannot be taken back: the rest of the output is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from protocol.output.deltas import MessageDelta
from protocol.output.tool_parsers._common import (
    DONE,
    OPEN,
    CallParser,
    CallReader,
    Out,
    StreamedCall,
    grow,
    skip_whitespace,
)
from protocol.output.tool_parsers.base import ToolSpec, default_call_id
from protocol.output.tool_parsers.registry import register_tool_parser

PYTHON_TAG = "<|python_tag|>"

_START, _CALL, _AFTER, _NEXT, _TEXT, _DROP = range(6)


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(CallParser):
    """One or more `;`-separated JSON call objects making up the output, else plain content."""

    def __init__(
        self, tools: Sequence[ToolSpec] = (), new_id: Callable[[int], str] = default_call_id
    ) -> None:
        super().__init__(tools, new_id)
        self._raw = ""  # the whole output, while no call was released (the content if none is)
        self._state = _START
        self._call: StreamedCall | None = None

    def feed(self, text: str) -> MessageDelta:
        """Release content and call deltas that `text` completes."""
        out = Out()
        if self._state == _TEXT:
            self._content.add(text, out)
        elif self._state != _DROP:
            if not self.called:
                self._raw = grow(self, "_raw", text)
            self._buffer += text
            self._run(out)
        return out.delta()

    def _run(self, out: Out) -> None:
        while True:
            state = self._state
            if state == _START:
                pos = skip_whitespace(self._buffer, 0)
                rest = self._buffer[pos:]
                if rest.startswith(PYTHON_TAG):
                    pos = skip_whitespace(self._buffer, pos + len(PYTHON_TAG))
                    rest = self._buffer[pos:]
                elif PYTHON_TAG.startswith(rest):  # nothing but whitespace yet, or a partial tag
                    return
                if not rest:
                    return
                if rest[0] != "{":  # not a call: the whole output is content
                    self._to_text(self._raw, out)
                    return
                self._buffer, self._state = rest, _NEXT
            elif state == _NEXT:  # an object, after the start or a `;`
                pos = skip_whitespace(self._buffer, 0)
                if pos == len(self._buffer):
                    return
                if self._buffer[pos] != "{":
                    self._to_text(self._buffer[pos:], out)
                    return
                self._buffer = self._buffer[pos:]
                self._call = StreamedCall(self._calls, CallReader(("parameters", "arguments"), True))
                self._state = _CALL
            elif state == _CALL:
                call = self._call
                assert call is not None
                chunk, self._buffer = self._buffer, ""
                if not chunk:
                    return
                status = call.step(chunk, out)
                if call.started:
                    self._content.call_started()
                if status == DONE:
                    self._buffer, self._state = call.reader.scanner.leftover, _AFTER
                elif status == OPEN:
                    return
                elif call.started:  # broken after release
                    self._buffer, self._state = "", _DROP
                    return
                else:  # no call: content, the whole output if this was the first object
                    self._to_text(call.reader.scanner.text if self.called else self._raw, out)
                    return
            elif state == _AFTER:  # `;` and another call, or the end, or trailing content
                pos = skip_whitespace(self._buffer, 0)
                if pos == len(self._buffer):
                    return
                if self._buffer[pos] == ";":
                    self._buffer, self._state = self._buffer[pos + 1 :], _NEXT
                else:
                    self._to_text(self._buffer, out)
                    return
            else:
                return

    def _to_text(self, text: str, out: Out) -> None:
        """From here on everything is content."""
        self._state, self._buffer, self._raw = _TEXT, "", ""
        self._content.add(text, out)

    def finish(self) -> MessageDelta:
        """Release the rest: a start or an unfinished object that released nothing is content."""
        out = Out()
        if self._state == _START:
            self._content.add(self._raw, out)
        elif self._state == _CALL:
            call = self._call
            assert call is not None
            if not call.started:
                self._content.add(
                    (call.reader.scanner.text + self._buffer) if self.called else self._raw, out
                )
            # else: the output ended inside a released call (max_tokens); its arguments stay incomplete
        elif self._state in (_AFTER, _NEXT):
            self._content.add(self._buffer, out)
        self._state, self._buffer, self._raw = _DROP, "", ""
        self._content.finish(self.called, out)
        return out.delta()

