"""Stop strings over a stream of text deltas.

Text is released only once it can no longer be the start of a stop string, so a client never sees
the first half of a stop string that later completes (vLLM holds back a fixed `max_len - 1` chars;
holding back only a real partial match releases text sooner). The match that *ends* first wins
(ties: the one that starts first), which is what a char-by-char stream would see: the result does
not depend on how the text was split into deltas.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds one sample's text; finds the first stop string and truncates the output there."""

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._include = include_stop_str_in_output
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._held = ""  # unreleased text that may start a stop string
        self._lookback = ""  # released tail still searched (include mode releases eagerly)
        self.matched: str | None = None

    @property
    def finished(self) -> bool:
        """True once a stop string matched; later text is dropped."""
        return self.matched is not None

    @property
    def held_back(self) -> str:
        """Text seen but not yet released."""
        return self._held

    def feed(self, text: str) -> str:
        """Add a text delta; return the text that is now safe to emit."""
        if self.matched is not None:
            return ""
        if not self._stops:
            return text
        search = self._lookback + self._held + text
        released_upto = len(self._lookback)
        match = self._first_match(search)
        if match is not None:
            start, stop = match
            self.matched = stop
            self._held = self._lookback = ""
            cut = start + len(stop) if self._include else start
            return search[released_upto:cut] if cut > released_upto else ""
        pending = search[released_upto:]
        if self._include:
            # Everything up to and including a stop string is output anyway: release now, but
            # keep a tail to find a stop string that spans into the next delta.
            self._lookback = (self._lookback + pending)[-(self._max_len - 1) :] if self._max_len > 1 else ""
            return pending
        hold = self._partial_match_length(pending)
        self._held = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """Release held-back text when the sample ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for length in range(min(len(text), self._max_len - 1), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0
