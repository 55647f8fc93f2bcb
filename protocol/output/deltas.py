"""What the output stages emit: message deltas in a runtime-neutral shape (no msgspec, no wire format).

A streamed message is the concatenation of its deltas: `content` and `reasoning` strings join, and
the `ToolCallDelta`s of one `index` join into one call (the first carries `id` and `name`, every one
carries an `arguments` fragment; the fragments concatenate to the call's JSON arguments).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call `index` (0-based within the message)."""

    index: int
    id: str | None = None  # only on the call's first delta
    name: str | None = None  # only on the call's first delta
    arguments: str = ""  # a fragment of the JSON arguments


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A whole tool call: `arguments` is a JSON object text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class MessageDelta:
    """What one step added to a message; empty fields add nothing."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def __add__(self, other: MessageDelta) -> MessageDelta:
        return MessageDelta(
            self.content + other.content, self.reasoning + other.reasoning, self.tool_calls + other.tool_calls
        )


def join_tool_calls(deltas: Iterable[ToolCallDelta]) -> list[ToolCall]:
    """The whole calls that a stream of deltas forms, in index order."""
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        if delta.id is not None:
            ids[delta.index] = delta.id
        if delta.name is not None:
            names[delta.index] = delta.name
        arguments.setdefault(delta.index, []).append(delta.arguments)
    return [
        ToolCall(id=ids.get(index, ""), name=names.get(index, ""), arguments="".join(arguments[index]))
        for index in sorted(arguments)
    ]


def join(deltas: Sequence[MessageDelta]) -> tuple[str, str, list[ToolCall]]:
    """(content, reasoning, tool calls) of a whole streamed message."""
    return (
        "".join(d.content for d in deltas),
        "".join(d.reasoning for d in deltas),
        join_tool_calls(call for d in deltas for call in d.tool_calls),
    )
