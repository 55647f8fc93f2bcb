"""Mistral tool calls, both formats the Mistral tokenizers produce.

* v0.3 (Mistral-7B-Instruct-v0.3, Mixtral): `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`
  (a lone object after the marker is accepted too);
* v11+ (Mistral Small 3.x, Devstral, ...): `[TOOL_CALLS]f[ARGS]{...}`, each call with its own
  marker; a `[CALL_ID]id` between the name and `[ARGS]` (some versions) is skipped.

Text before the first marker is content; text after the calls is content too; whitespace-only
stretches next to calls are dropped. Arguments stream as the model's raw JSON text.

Mistral's API takes tool-call ids of exactly 9 characters [a-zA-Z0-9] (its chat template rejects
others when the calls come back in the history), so ids are derived from the id factory's id: a
hash of `new_id(index)` mapped onto that alphabet, deterministic like the factory.

When a tool section is not what it should be: if nothing of it was released, the rest of the
output from its `[TOOL_CALLS]` on is content (always so when the section arrives whole, as in the
non-streaming result); if a call from it was already released, the rest of the output is dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence

from protocol.output.deltas import MessageDelta
from protocol.output.markers import split_at
from protocol.output.tool_parsers._common import (
    DONE,
    OPEN,
    CallParser,
    CallReader,
    Calls,
    Out,
    StreamedCall,
    ValueScanner,
    grow,
    skip_whitespace,
)
from protocol.output.tool_parsers.base import ToolSpec, default_call_id
from protocol.output.tool_parsers.registry import register_tool_parser

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")
_ID_CHARS = re.compile(r"[A-Za-z0-9]*")


def mistral_call_id(call_id: str) -> str:
    """A 9-character [a-zA-Z0-9] id derived from `call_id` (Mistral's templates accept no other)."""
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ALPHABET[byte % len(_ALPHABET)] for byte in digest[:9])


(
    _TEXT,  # content; looking for the marker
    _SECTION,  # after a marker: `[`, `{` or a name comes next
    _ELEMENT,  # in the array: an object or `]` next
    _IN_ELEMENT,  # a call object arriving
    _AFTER_ELEMENT,  # `,` or `]` next
    _NAME,  # `name[ARGS]` or `name[CALL_ID]`
    _CALL_ID,  # the model's id, up to `[ARGS]`
    _ARGUMENTS,  # the arguments object after `[ARGS]`
    _CONTENT,  # a broken section released nothing: the rest is content
    _DROP,  # a broken section after a released call: the rest is dropped
) = range(10)


@register_tool_parser("mistral")
class MistralToolParser(CallParser):
    """`[TOOL_CALLS]` followed by a JSON array of calls, or by `name[ARGS]{...}`."""

    skip_special_tokens = False  # [TOOL_CALLS] and [ARGS] are control tokens

    def __init__(
        self, tools: Sequence[ToolSpec] = (), new_id: Callable[[int], str] = default_call_id
    ) -> None:
        super().__init__(tools, new_id)
        self._calls = Calls(lambda index: mistral_call_id(new_id(index)))
        self._state = _TEXT
        self._section = ""  # the text after the current marker (the content if it proves broken)
        self._pos = 0  # how far into `_section` was consumed
        self._released = False  # whether a call of this section was released
        self._in_array = False
        self._call: StreamedCall | None = None
        self._name = ""
        self._arguments: ValueScanner | None = None
        self._released_current = False  # the `name[ARGS]` call now arriving was released

    def feed(self, text: str) -> MessageDelta:
        """Release content and call deltas that `text` completes."""
        out = Out()
        if self._state == _TEXT:
            self._buffer += text
        elif self._state == _CONTENT:
            self._content.add(text, out)
        elif self._state != _DROP:
            self._section = grow(self, "_section", text)
        self._run(out)
        return out.delta()

    def _run(self, out: Out) -> None:
        while True:
            state = self._state
            if state == _TEXT:
                text, rest, found = split_at(self._buffer, MARKER)
                self._content.add(text, out)
                if not found:
                    self._buffer = rest
                    return
                self._section, self._buffer = rest, ""
                self._pos, self._released, self._state = 0, False, _SECTION
            elif state in (_CONTENT, _DROP):
                return
            elif state in (_IN_ELEMENT, _ARGUMENTS):
                if not self._step_call(out):
                    return
            else:
                if not self._step_punctuation(out):
                    return

    def _step_punctuation(self, out: Out) -> bool:
        """Advance over the section's structure; False when more text is needed."""
        state = self._state
        section = self._section
        if state in (_NAME, _CALL_ID):
            return self._step_name(out)
        pos = skip_whitespace(section, self._pos)
        if pos >= len(section):
            return False  # `_pos` stays before the whitespace: after a lone object it may be content
        char = section[pos]
        if state == _SECTION:
            if char == "[":
                self._in_array, self._state, self._pos = True, _ELEMENT, pos + 1
            elif char == "{":
                self._in_array, self._state, self._pos = False, _ELEMENT, pos
            else:
                self._name, self._state, self._pos = "", _NAME, pos
        elif state == _ELEMENT:
            if char == "{":
                self._call = StreamedCall(self._calls, CallReader())
                self._state, self._pos = _IN_ELEMENT, pos
            elif char == "]" and self._in_array:
                self._end_section(pos + 1)
            else:
                self._broken(out)
        elif state == _AFTER_ELEMENT:
            if char == "," and self._in_array:
                self._state, self._pos = _ELEMENT, pos + 1
            elif char == "]" and self._in_array:
                self._end_section(pos + 1)
            elif not self._in_array:
                self._end_section(self._pos)
            else:
                self._broken(out)
        return True

    def _step_name(self, out: Out) -> bool:
        """`name[ARGS]` or `name[CALL_ID]id[ARGS]`: the name, then the arguments scanner."""
        section, pos = self._section, self._pos
        word = (_NAME_CHARS if self._state == _NAME else _ID_CHARS).match(section, pos)
        assert word is not None
        end = word.end()
        rest = section[end:]
        if self._state == _NAME and rest.startswith(CALL_ID) and end > pos:
            self._name, self._state, self._pos = section[pos:end], _CALL_ID, end + len(CALL_ID)
            return True
        if rest.startswith(ARGS) and (end > pos or self._state == _CALL_ID):
            if self._state == _NAME:
                self._name = section[pos:end]
            self._arguments, self._state, self._pos = ValueScanner(), _ARGUMENTS, end + len(ARGS)
            return True
        if rest == ARGS[: len(rest)] or (self._state == _NAME and rest == CALL_ID[: len(rest)]):
            return False  # more name, or a marker arriving
        self._broken(out)
        return True

    def _step_call(self, out: Out) -> bool:
        """Feed the arriving call its text; False when it needs more."""
        chunk = self._section[self._pos :]
        self._pos = len(self._section)
        if self._state == _IN_ELEMENT:
            call = self._call
            assert call is not None
            status = call.step(chunk, out)
            self._note_start(call.started)
            if status == DONE:
                self._pos -= len(call.reader.scanner.leftover)
                self._state = _AFTER_ELEMENT
                return True
            if status != OPEN:
                self._broken(out)
                return True
            return False
        scanner = self._arguments
        assert scanner is not None
        scanner.feed(chunk)
        if scanner.started and scanner.first != "{":
            self._broken(out)
            return True
        if scanner.done:
            self._pos -= len(scanner.leftover)
            if self._released_current:
                out.call(self._calls.more(scanner.raw_from(self._calls.sent)))
            else:
                try:
                    valid = isinstance(json.loads(scanner.raw), dict)
                except ValueError:
                    valid = False
                if not valid:
                    self._broken(out)
                    return True
                out.call(self._calls.start(self._name, scanner.raw))
                self._note_start(True)
            self._released_current = False
            self._end_section(self._pos)
            return True
        if self._released_current:
            out.call(self._calls.more(scanner.raw_from(self._calls.sent)))
        elif scanner.started:
            out.call(self._calls.start(self._name, scanner.raw))
            self._released_current = True
            self._note_start(True)
        return False

    def _note_start(self, started: bool) -> None:
        """A call of this section was released: the content stretch before it ends here."""
        if started:
            self._released = True
            self._content.call_started()

    def _end_section(self, pos: int) -> None:
        """The calls are over: what follows is content again (or another marker)."""
        self._buffer = self._section[pos:]
        self._section, self._pos, self._state = "", 0, _TEXT

    def _broken(self, out: Out) -> None:
        if self._released:
            self._state = _DROP
        else:
            self._content.add(MARKER + self._section, out)
            self._state = _CONTENT
        self._section, self._pos = "", 0

    def finish(self) -> MessageDelta:
        """Release the rest; an unfinished section that released nothing is content."""
        out = Out()
        self._run(out)
        state = self._state
        if state == _TEXT:
            self._content.add(self._buffer, out)
        elif state == _AFTER_ELEMENT and not self._in_array:
            self._end_section(self._pos)
            self._content.add(self._buffer, out)
        elif state not in (_CONTENT, _DROP) and not self._released:
            self._content.add(MARKER + self._section, out)
        # else: the output ended inside released calls (max_tokens); what went out stays
        self._buffer, self._section, self._state = "", "", _DROP
        self._content.finish(self.called, out)
        return out.delta()

