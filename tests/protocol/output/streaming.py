"""Helpers for the output-stage tests: chunkings of a text, running a parser, the delta shape rules."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from protocol.output.deltas import MessageDelta, ToolCall, ToolCallDelta, join


class Parser(Protocol):
    def feed(self, text: str) -> MessageDelta: ...
    def finish(self) -> MessageDelta: ...


SEEDS = range(8)


def random_chunks(text: str, seed: int, longest: int = 7) -> list[str]:
    """`text` cut at random places (pieces of 1..`longest` characters), reproducibly."""
    rng = random.Random(seed)
    chunks, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, longest)
        chunks.append(text[pos : pos + size])
        pos += size
    return chunks


def chunkings(text: str) -> Iterator[list[str]]:
    """Whole, a character at a time, with empty pieces between, and several random cuts."""
    yield [text]
    yield list(text)
    yield [piece for char in text for piece in (char, "")]
    for seed in SEEDS:
        yield random_chunks(text, seed)
    yield random_chunks(text, 99, longest=25)


def run(parser: Parser, chunks: list[str]) -> list[MessageDelta]:
    """Every delta the parser releases for `chunks`, `finish` included."""
    return [parser.feed(chunk) for chunk in chunks] + [parser.finish()]


def whole(make: Callable[[], Parser], text: str) -> tuple[str, str, list[ToolCall]]:
    """The non-streaming result: the whole text fed at once, then finish."""
    return join(run(make(), [text]))


def summary(result: tuple[str, str, list[ToolCall]]) -> tuple[str, str, list[tuple[str, Any]]]:
    """(content, reasoning, [(name, parsed arguments)]), what the tables state."""
    content, reasoning, calls = result
    return content, reasoning, [(call.name, json.loads(call.arguments)) for call in calls]


def check_shapes(deltas: list[MessageDelta], complete: bool = True) -> None:
    """vLLM's delta rules: a call's first delta (only) has id and name; indexes 0, 1, ... in order;
    each call's argument fragments join to a JSON object (when the calls are `complete`)."""
    calls: list[ToolCallDelta] = [call for delta in deltas for call in delta.tool_calls]
    seen: dict[int, list[ToolCallDelta]] = {}
    last = -1
    for call in calls:
        assert call.index >= last, f"index went back: {calls}"
        if call.index not in seen:
            assert call.index == last + 1, f"indexes must be 0, 1, ...: {calls}"
            assert call.id and call.name, f"a call's first delta has id and name: {call}"
        else:
            assert call.id is None and call.name is None, f"only the first delta has id and name: {call}"
            assert call.arguments, f"a later delta carries an arguments fragment: {call}"
        seen.setdefault(call.index, []).append(call)
        last = call.index
    for pieces in seen.values() if complete else ():
        assert isinstance(json.loads("".join(piece.arguments for piece in pieces)), dict)
    for delta in deltas:
        assert isinstance(delta.content, str) and isinstance(delta.reasoning, str)
