"""Hermes 2 Pro / Qwen2.5 / Qwen3 tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Text outside the blocks is content, verbatim, except that whitespace-only stretches next to calls
are dropped (so a message that is only calls has no content). A call is released as soon as its
name is known and its arguments then stream as the model's raw JSON text. "arguments" written
before "name" is held until the name arrives; arguments given as a JSON string are released at
the string's end, as its content; a missing or null "arguments" is `{}`.

A block whose JSON is not a call (invalid JSON, no name, arguments neither object nor string) is
returned as content, markers included, when it was seen whole before anything of it was released:
always in the non-streaming result. Streamed in pieces, a block is released from its name on and
what went out cannot be taken back: if its JSON breaks later, the rest of the block is dropped.
A block the output ends inside (no `</tool_call>`) is a call if its JSON object is complete, so a
model that stops at end-of-sequence right after the object still calls the tool.

An output that opens with a bare call object, without the tags, is a call too when the object has
"arguments" and names one of the request's tools, also inside a ```json fence: Qwen2.5-Coder
answers so (bare in bfloat16, fenced in float32) although its template asks for the tags, and
vLLM's hermes parser then returns the call as content. Such an opening object is held until its
name shows whether it is a call; one that is not is content, fence included.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from protocol.output.deltas import MessageDelta
from protocol.output.markers import split_at
from protocol.output.tool_parsers._common import (
    BROKEN,
    DONE,
    INVALID,
    OPEN,
    CallParser,
    CallReader,
    Out,
    StreamedCall,
    skip_whitespace,
)
from protocol.output.tool_parsers.base import ToolSpec, default_call_id
from protocol.output.tool_parsers.registry import register_tool_parser

START = "<tool_call>"
END = "</tool_call>"

_TEXT, _BLOCK, _AFTER, _BAD = range(4)


# an output opening with a call object, bare or in a ```json fence; and what may still become one
_OPENING = re.compile(r"\s*(```(?:json)?\s*)?\{")
_OPENING_PREFIX = re.compile(r"\s*(`{1,3}|```j|```js|```jso|```json|```(?:json)?\s+)?")
# the fence's end after a fenced call
_CLOSING_FENCE = re.compile(r"\s*```")
_CLOSING_FENCE_PREFIX = re.compile(r"\s*`{0,2}")


class _BareCallReader(CallReader):
    """An untagged object is released only once its arguments began as an object: a bare JSON
    answer must not become a call that later turns out not to be one."""

    def startable(self) -> bool:
        if not super().startable():
            return False
        member = self._arguments()
        text = self.scanner.text
        return member is not None and member.start < len(text) and text[member.start] == "{"


@register_tool_parser("hermes")
class HermesToolParser(CallParser):
    """`<tool_call>` JSON `</tool_call>` blocks anywhere in the output; the rest is content."""

    skip_special_tokens = False  # Qwen's <tool_call> and </tool_call> are special tokens

    def __init__(
        self, tools: Sequence[ToolSpec] = (), new_id: Callable[[int], str] = default_call_id
    ) -> None:
        super().__init__(tools, new_id)
        self._state = _TEXT
        self._call: StreamedCall | None = None
        self._invalid = False  # the block after the object is not a call: it becomes content
        self._keep_bad = False  # a broken block's text is content (True) or dropped (released already)
        self._bare = False  # the current block is a bare object at the start of the output (no tags)
        self._opening = True  # nothing but whitespace seen yet: a bare call object may come
        self._fence = ""  # whitespace and ```json fence before a bare call object (dropped when it is a call)
        self._closing_fence = False  # after a fenced bare call: its closing ``` may follow

    def feed(self, text: str) -> MessageDelta:
        """Release content and call deltas that `text` completes."""
        self._buffer += text
        out = Out()
        self._run(out)
        return out.delta()

    def _run(self, out: Out) -> None:
        while True:
            if self._state == _TEXT:
                if self._opening:
                    opening = _OPENING.match(self._buffer)
                    if opening is None:
                        if _OPENING_PREFIX.fullmatch(self._buffer):
                            return  # whitespace, or a fence still arriving
                        self._opening = False
                    else:
                        self._opening = False
                        names = frozenset(tool.name for tool in self.tools) or None
                        self._call = StreamedCall(self._calls, _BareCallReader(require_arguments=True, names=names))
                        # what came before the object (whitespace, a fence): content if it is no call
                        self._fence = self._buffer[: opening.end() - 1]
                        self._buffer, self._bare, self._state = self._buffer[opening.end() - 1 :], True, _BLOCK
                        continue
                if self._closing_fence:
                    if _CLOSING_FENCE_PREFIX.fullmatch(self._buffer):
                        return  # whitespace, or part of the closing ```
                    self._closing_fence = False
                    closing = _CLOSING_FENCE.match(self._buffer)
                    if closing is not None:
                        self._buffer = self._buffer[closing.end() :]
                text, self._buffer, found = split_at(self._buffer, START)
                self._content.add(text, out)
                if not found:
                    return
                self._call = StreamedCall(self._calls, CallReader())
                self._state = _BLOCK
            elif self._state == _BLOCK:
                call = self._call
                assert call is not None
                chunk, self._buffer = self._buffer, ""
                if not chunk:
                    return
                was_started = call.started
                status = call.step(chunk, out)
                if call.started and not was_started:
                    self._content.call_started()
                if self._bare and status != OPEN:
                    self._end_bare(status, out)
                elif status == DONE:
                    self._buffer, self._invalid, self._state = call.reader.scanner.leftover, False, _AFTER
                elif status == INVALID and call.reader.done:  # a complete object that is no call
                    self._buffer, self._invalid, self._state = call.reader.scanner.leftover, True, _AFTER
                elif status in (INVALID, BROKEN):
                    self._buffer, self._keep_bad, self._state = (
                        call.reader.scanner.text,
                        status == INVALID,
                        _BAD,
                    )
                else:
                    return
            elif self._state == _AFTER:  # the object ended: `</tool_call>` may follow
                start = skip_whitespace(self._buffer, 0)
                rest = self._buffer[start:]
                if rest.startswith(END):
                    self._end_block(self._buffer[: start + len(END)], out)
                    self._buffer = rest[len(END) :]
                elif rest == END[: len(rest)]:  # nothing yet, or a partial `</tool_call>`
                    return
                else:  # the block ends without its closing marker
                    self._end_block("", out)
            else:  # _BAD: a block that is not JSON, up to its `</tool_call>`
                at = self._buffer.find(END)
                if at < 0:
                    return
                if self._keep_bad:
                    self._content.add(START + self._buffer[: at + len(END)], out)
                self._buffer = self._buffer[at + len(END) :]
                self._state = _TEXT

    def _end_bare(self, status: str, out: Out) -> None:
        """A bare opening object ended: a call, or content (what no call released is kept)."""
        call = self._call
        assert call is not None
        scanner = call.reader.scanner
        if status == DONE:
            self._buffer, self._closing_fence = scanner.leftover, "`" in self._fence
        elif status == INVALID and call.reader.done:  # a JSON answer that is no call
            self._content.add(self._fence + scanner.text[: scanner.end], out)
            self._buffer = scanner.leftover
        elif status == INVALID:  # not JSON after all: read the text again as plain output
            self._buffer = self._fence + scanner.text
        else:  # BROKEN after release: the rest of the object is dropped
            self._buffer = ""
        self._bare, self._state = False, _TEXT

    def _end_block(self, closing: str, out: Out) -> None:
        """The block is over: a call's closing text goes, a non-call block is content with it."""
        if self._invalid:
            call = self._call
            assert call is not None
            scanner = call.reader.scanner
            self._content.add(START + scanner.text[: scanner.end] + closing, out)
        self._state = _TEXT

    def finish(self) -> MessageDelta:
        """Release the rest: an unclosed block is a call if its object was complete, else content."""
        out = Out()
        self._run(out)
        if self._state == _BLOCK:
            call = self._call
            assert call is not None
            if not call.started:  # an unfinished object, never released: content
                self._content.add((self._fence if self._bare else START) + call.reader.scanner.text, out)
            # else: the output ended inside a released call (max_tokens); its arguments stay incomplete
        elif self._state == _AFTER:
            if self._invalid:
                self._end_block("", out)
            self._content.add(self._buffer, out)
        elif self._state == _BAD:
            if self._keep_bad:
                self._content.add(START + self._buffer, out)
        else:
            self._content.add(self._buffer, out)
        self._buffer = ""
        self._state = _TEXT
        self._content.finish(self.called, out)
        return out.delta()

