"""`best_of`: sample more candidates than asked for and return the `n` most likely (vLLM's semantics).

A request with `best_of > n` runs `best_of` samples exactly as `n` samples run; this collector
holds their events back, because which ones are returned is known only when every candidate has
finished. Then the `n` with the highest cumulative logprob come out, each as one event holding its
whole output, re-indexed 0..n-1 best first. The tokens of the candidates left out still count in
`usage` (as vLLM counts them): the first returned event carries them in `num_discarded_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from protocol.engine_api import TokenLogprobs, Tokens


@dataclass
class _Candidate:
    """One candidate's events folded together."""

    first: Tokens
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    last: Tokens | None = None  # the finishing event

    def add(self, event: Tokens) -> None:
        self.token_ids.extend(event.token_ids)
        if event.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(event.logprobs)
        if event.finish_reason is not None:
            self.last = event

    @property
    def cumulative_logprob(self) -> float:
        assert self.last is not None
        return self.last.cumulative_logprob or 0.0


class BestOfCollector:
    """Holds the events of `best_of` candidates; `collect` answers the n chosen ones when all finish."""

    def __init__(self, n: int, best_of: int) -> None:
        self.n = n
        self.best_of = best_of
        self._candidates: dict[int, _Candidate] = {}

    def collect(self, event: Tokens) -> list[Tokens]:
        candidate = self._candidates.get(event.index)
        if candidate is None:
            candidate = self._candidates[event.index] = _Candidate(event)
        candidate.add(event)
        finished = [c for c in self._candidates.values() if c.last is not None]
        if len(finished) < self.best_of:
            return []
        return self._choose()

    def _choose(self) -> list[Tokens]:
        # best first; equal scores keep the candidates' order (a stable sort)
        ranked = sorted(
            (self._candidates[i] for i in sorted(self._candidates)),
            key=lambda c: c.cumulative_logprob,
            reverse=True,
        )
        chosen, dropped = ranked[: self.n], ranked[self.n :]
        discarded = sum(len(c.token_ids) for c in dropped)
        events = []
        for index, candidate in enumerate(chosen):
            last = candidate.last
            assert last is not None
            events.append(
                msgspec.structs.replace(
                    last,
                    index=index,
                    token_ids=tuple(candidate.token_ids),
                    logprobs=None if candidate.logprobs is None else tuple(candidate.logprobs),
                    prompt_logprobs=candidate.first.prompt_logprobs,
                    num_discarded_tokens=discarded if index == 0 else 0,
                )
            )
        return events
