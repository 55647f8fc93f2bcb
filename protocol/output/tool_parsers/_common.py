"""Pieces the tool parsers share: incremental JSON scanning, call bookkeeping, content whitespace.

The scanners find where JSON values end without parsing them (string, escape and nesting state
only), so a call's arguments can be released as raw model text while they arrive; the whole text
is checked with `json.loads` once it is complete. Every scanner is a pure function of the text fed
so far, whatever the chunking, which is what makes streamed and whole results agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from protocol.output.deltas import MessageDelta, ToolCallDelta
from protocol.output.tool_parsers.base import ToolParser, ToolSpec, default_call_id

_WHITESPACE = re.compile(r"[ \t\r\n]*")
_STRUCTURE = re.compile(r'["{}\[\]]')
_STRING = re.compile(r'["\\]')
_SCALAR_END = re.compile(r"[ \t\r\n,}\]]")


def grow(owner: object, attribute: str, text: str) -> str:
    """`owner.attribute + text`, appended in place where CPython can: the attribute lets go of the
    string first, so a long buffer fed token by token is not copied whole at every token."""
    value = getattr(owner, attribute)
    setattr(owner, attribute, "")
    value += text
    return value


def skip_whitespace(text: str, pos: int) -> int:
    """The first position at or after `pos` that is not JSON whitespace."""
    match = _WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


class _Value:
    """Scan state of one JSON value: its kind, nesting depth and string/escape state."""

    __slots__ = ("start", "pos", "end", "kind", "depth", "in_string", "escape")

    def __init__(self, text: str, start: int) -> None:
        self.start = start
        self.end = -1
        self.depth = 0
        self.escape = False
        first = text[start]
        if first in "{[":
            self.kind, self.depth, self.in_string, self.pos = "container", 1, False, start + 1
        elif first == '"':
            self.kind, self.in_string, self.pos = "string", True, start + 1
        else:
            self.kind, self.in_string, self.pos = "scalar", False, start

    def advance(self, text: str) -> bool:
        """Scan on from `pos`; True once the value ended (`end` is then the index after it)."""
        if self.kind == "scalar":  # ends at a delimiter, so a number at the end of the text may go on
            match = _SCALAR_END.search(text, self.pos)
            if match is None:
                self.pos = len(text)
                return False
            self.pos = self.end = match.start()
            return True
        pos, size = self.pos, len(text)
        while pos < size:
            if self.in_string:
                if self.escape:
                    self.escape = False
                    pos += 1
                    continue
                match = _STRING.search(text, pos)
                if match is None:
                    pos = size
                    break
                pos = match.start() + 1
                if text[pos - 1] == "\\":
                    self.escape = True
                    continue
                self.in_string = False
                if self.kind == "string":
                    self.pos = self.end = pos
                    return True
                continue
            match = _STRUCTURE.search(text, pos)
            if match is None:
                pos = size
                break
            pos = match.start() + 1
            char = text[pos - 1]
            if char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    self.pos = self.end = pos
                    return True
        self.pos = pos
        return False


class ValueScanner:
    """Finds where one JSON value (after optional whitespace) ends, fed piece by piece."""

    def __init__(self) -> None:
        self.text = ""
        self._value: _Value | None = None

    def feed(self, text: str) -> None:
        """Take the next piece of text and scan it."""
        self.text = grow(self, "text", text)
        if self._value is None:
            start = skip_whitespace(self.text, 0)
            if start == len(self.text):
                return
            self._value = _Value(self.text, start)
        if self._value.end < 0:
            self._value.advance(self.text)

    @property
    def started(self) -> bool:
        """Whether the value's first character arrived."""
        return self._value is not None

    @property
    def first(self) -> str:
        """The value's first character ("" before it arrives)."""
        return "" if self._value is None else self.text[self._value.start]

    @property
    def done(self) -> bool:
        return self._value is not None and self._value.end >= 0

    @property
    def raw(self) -> str:
        """The value's text so far (all of it once `done`)."""
        return self.raw_from(0)

    def raw_from(self, offset: int) -> str:
        """The value's text so far, from `offset` on."""
        if self._value is None:
            return ""
        return self.text[
            self._value.start + offset : self._value.end if self._value.end >= 0 else self._value.pos
        ]

    @property
    def leftover(self) -> str:
        """What was fed after the value's end."""
        return self.text[self._value.end :] if self._value is not None and self._value.end >= 0 else ""


@dataclass(frozen=True, slots=True)
class Member:
    """One `"key": value` of an object; `end` is -1 while the value is still arriving."""

    key: str
    start: int
    end: int


_START, _KEY_OR_END, _KEY, _KEY_ONLY, _COLON, _VALUE, _IN_VALUE, _AFTER, _DONE, _ERROR = range(10)


class ObjectScanner:
    """Scans one JSON object's top level, fed piece by piece: its members' keys and raw value spans.

    Lenient about what is inside values (`json.loads` checks the whole once complete); strict about
    the object's own punctuation, so text that is not an object shows up as `error` early.
    """

    def __init__(self) -> None:
        self.text = ""
        self.members: list[Member] = []
        self.end = -1  # index after the closing brace
        self.error = False
        self._state = _START
        self._pos = 0
        self._key = ""
        self._value: _Value | None = None

    def feed(self, text: str) -> None:
        """Take the next piece of text and scan it (nothing past the closing brace)."""
        self.text = grow(self, "text", text)
        self._run()

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def leftover(self) -> str:
        """What was fed after the closing brace."""
        return self.text[self.end :] if self.end >= 0 else ""

    def current(self) -> Member | None:
        """The member whose value is arriving now (its `end` is -1); None between members."""
        if self._state == _IN_VALUE and self._value is not None:
            return Member(self._key, self._value.start, -1)
        return None

    def scanned(self) -> int:
        """How far the text was scanned (the end of the arriving value's text so far)."""
        return self._value.pos if self._state == _IN_VALUE and self._value is not None else self._pos

    def _fail(self) -> None:
        self._state = _ERROR
        self.error = True

    def _run(self) -> None:
        text = self.text
        while self._state not in (_DONE, _ERROR):
            if self._state in (_KEY, _IN_VALUE):
                value = self._value
                assert value is not None
                if not value.advance(text):
                    return
                self._pos = value.end
                if self._state == _KEY:
                    try:
                        self._key = json.loads(text[value.start : value.end])
                    except ValueError:
                        self._fail()
                        return
                    self._state = _COLON
                else:
                    self.members.append(Member(self._key, value.start, value.end))
                    self._state = _AFTER
                self._value = None
                continue
            pos = skip_whitespace(text, self._pos)
            self._pos = pos
            if pos >= len(text):
                return
            char = text[pos]
            state = self._state
            if state == _START:
                if char != "{":
                    self._fail()
                    return
                self._state, self._pos = _KEY_OR_END, pos + 1
            elif state in (_KEY_OR_END, _KEY_ONLY):
                if char == '"':
                    self._value, self._state = _Value(text, pos), _KEY
                elif char == "}" and state == _KEY_OR_END:
                    self._state, self._pos, self.end = _DONE, pos + 1, pos + 1
                else:
                    self._fail()
            elif state == _COLON:
                if char != ":":
                    self._fail()
                    return
                self._state, self._pos = _VALUE, pos + 1
            elif state == _VALUE:
                if char in ",:}]":
                    self._fail()
                    return
                self._value, self._state = _Value(text, pos), _IN_VALUE
            elif state == _AFTER:
                if char == ",":
                    self._state, self._pos = _KEY_ONLY, pos + 1
                elif char == "}":
                    self._state, self._pos, self.end = _DONE, pos + 1, pos + 1
                else:
                    self._fail()


def arguments_text(raw: str) -> str | None:
    """A complete arguments value's JSON object text, or None when it cannot be one.

    An object is kept as the model wrote it; a string is taken as JSON text already (some models
    quote their arguments); null means no arguments.
    """
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, dict):
        return raw
    if isinstance(value, str):
        return value
    if value is None:
        return "{}"
    return None


class CallReader:
    """One `{"name": ..., "arguments": {...}}` object as it arrives: the name once known, the arguments text.

    `arguments_keys` are the keys taken for the arguments (the first present wins); with
    `require_arguments` an object without them is no call (for formats where a bare JSON answer
    could look like a call).
    """

    def __init__(
        self,
        arguments_keys: Sequence[str] = ("arguments", "parameters"),
        require_arguments: bool = False,
        names: frozenset[str] | None = None,
    ) -> None:
        self.scanner = ObjectScanner()
        self._keys = tuple(arguments_keys)
        self._require = require_arguments
        self._names = names  # when given, only these names make a call
        self._name: str | None = None

    def feed(self, text: str) -> None:
        self.scanner.feed(text)

    @property
    def done(self) -> bool:
        return self.scanner.done

    @property
    def error(self) -> bool:
        return self.scanner.error

    @property
    def name(self) -> str | None:
        """The call's name, once its string is complete (None if it is not a usable name)."""
        if self._name is None:
            for member in self.scanner.members:
                if member.key == "name":
                    try:
                        name = json.loads(self.scanner.text[member.start : member.end])
                    except ValueError:
                        return None
                    if isinstance(name, str) and name and (self._names is None or name in self._names):
                        self._name = name
                    break
        return self._name

    def _arguments(self) -> Member | None:
        for member in self.scanner.members:
            if member.key in self._keys:
                return member
        current = self.scanner.current()
        return current if current is not None and current.key in self._keys else None

    def startable(self) -> bool:
        """Whether the call can be released: its name is known (and its arguments began, if required)."""
        return self.name is not None and (not self._require or self._arguments() is not None)

    def arguments_so_far(self, offset: int = 0) -> str:
        """The arguments text that can be released now, from `offset` on: an object's raw text as
        it arrives, else the whole value once complete (a quoted or null value is only known at its
        end). Released text is always a beginning of the final arguments of a valid call."""
        member = self._arguments()
        if member is None:
            return ""
        text = self.scanner.text
        if text[member.start] == "{":
            return text[member.start + offset : member.end if member.end >= 0 else self.scanner.scanned()]
        if member.end < 0:
            return ""
        return (arguments_text(text[member.start : member.end]) or "")[offset:]

    def result(self) -> tuple[str, str] | None:
        """(name, arguments) of the complete object, or None when it is not a valid call."""
        if not self.scanner.done:
            return None
        try:
            whole = json.loads(self.scanner.text[: self.scanner.end])
        except ValueError:
            return None
        name = self.name
        if not isinstance(whole, dict) or name is None:
            return None
        member = self._arguments()
        if member is None:
            return None if self._require else (name, "{}")
        arguments = arguments_text(self.scanner.text[member.start : member.end])
        return None if arguments is None else (name, arguments)


class Calls:
    """The message's released calls: index and id allocation, and how much of a call's arguments went out."""

    def __init__(self, new_id: Callable[[int], str]) -> None:
        self.new_id = new_id
        self.count = 0
        self.sent = 0  # characters of the current call's arguments released

    def start(self, name: str, arguments: str) -> ToolCallDelta:
        """The first delta of the next call (its id and name, and the arguments known so far)."""
        index = self.count
        self.count += 1
        self.sent = len(arguments)
        return ToolCallDelta(index=index, id=self.new_id(index), name=name, arguments=arguments)

    def more(self, fragment: str) -> ToolCallDelta | None:
        """The current call's next arguments fragment (None when there is none)."""
        if not fragment:
            return None
        self.sent += len(fragment)
        return ToolCallDelta(index=self.count - 1, arguments=fragment)


OPEN, DONE, INVALID, BROKEN = "open", "done", "invalid", "broken"


class StreamedCall:
    """A call object streaming in: released once its name is known, checked whole when it arrives whole.

    `step` returns a status: OPEN (more to come), DONE (complete; released), INVALID (not a call,
    nothing was released: the caller may return its text as content) or BROKEN (the JSON went wrong
    after the call was released; what went out cannot be taken back).
    """

    def __init__(self, calls: Calls, reader: CallReader) -> None:
        self.calls = calls
        self.reader = reader
        self.started = False

    def step(self, text: str, out: Out) -> str:
        """Feed the call's next text; what can be released goes to `out`; returns the status."""
        reader = self.reader
        reader.feed(text)
        if reader.done:
            result = reader.result()
            if not self.started:
                if result is None:
                    return INVALID
                self.started = True
                out.call(self.calls.start(*result))
                return DONE
            sent = self.calls.sent
            out.call(
                self.calls.more(result[1][sent:] if result is not None else reader.arguments_so_far(sent))
            )
            return DONE
        if reader.error:
            return BROKEN if self.started else INVALID
        if self.started:
            out.call(self.calls.more(reader.arguments_so_far(self.calls.sent)))
        elif reader.startable():
            name = reader.name
            assert name is not None
            self.started = True
            out.call(self.calls.start(name, reader.arguments_so_far()))
        return OPEN


@dataclass
class Out:
    """What one `feed` or `finish` releases, gathered as it is found."""

    content: list[str] = field(default_factory=list)
    calls: list[ToolCallDelta] = field(default_factory=list)

    def text(self, text: str) -> None:
        if text:
            self.content.append(text)

    def call(self, delta: ToolCallDelta | None) -> None:
        if delta is not None:
            self.calls.append(delta)

    def delta(self) -> MessageDelta:
        return MessageDelta(content="".join(self.content), tool_calls=tuple(self.calls))


class Content:
    """Content around calls: a whitespace-only stretch next to a call is dropped.

    vLLM returns no content for a message that is only tool calls, and the newlines a model puts
    between or after its calls are not meant as an answer. A stretch's leading whitespace is held
    until text follows it (released together) or a call starts (dropped).
    """

    def __init__(self) -> None:
        self._pending = ""
        self._has_text = False

    def add(self, text: str, out: Out) -> None:
        if self._has_text:
            out.text(text)
        elif text.strip():
            out.text(self._pending + text)
            self._pending, self._has_text = "", True
        else:
            self._pending += text

    def call_started(self) -> None:
        """A call begins here: the whitespace before it goes, and a new stretch begins after it."""
        self._pending, self._has_text = "", False

    def finish(self, called: bool, out: Out) -> None:
        """The output ended: trailing whitespace-only text is content only in a message without calls."""
        if not called:
            out.text(self._pending)
        self._pending = ""


class CallParser(ToolParser):
    """What the built-in parsers keep: the released calls, the content around them, unread text."""

    def __init__(self, tools: Sequence[ToolSpec] = (), new_id: Callable[[int], str] = default_call_id) -> None:
        super().__init__(tools, new_id)
        self._calls = Calls(self.new_id)
        self._content = Content()
        self._buffer = ""

    @property
    def called(self) -> bool:
        return self._calls.count > 0
