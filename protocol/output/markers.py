"""Splitting streamed text on a marker (`</think>`, `<tool_call>`, `[TOOL_CALLS]`): the part of a
chunk that may be a marker still arriving is held back. Shared by the reasoning and tool parsers."""

from __future__ import annotations


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`.

    That end is held back: the next chunk may complete the marker (a tag split across tokens).
    """
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def split_at(buffer: str, marker: str) -> tuple[str, str, bool]:
    """(text before `marker` or safe to release, text to keep, whether the marker was found).

    When found, the kept text is what follows the marker; otherwise it is the possible partial marker.
    """
    at = buffer.find(marker)
    if at >= 0:
        return buffer[:at], buffer[at + len(marker) :], True
    held = partial_suffix(buffer, marker)
    return buffer[: len(buffer) - held], buffer[len(buffer) - held :], False
