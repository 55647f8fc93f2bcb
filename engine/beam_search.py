"""Beam search on the paged cache (vLLM v0's semantics, HF's stopping rules).

A request keeps up to `width` beams (`best_of` if given, else `n`), each a scheduled sequence.
It starts from one beam; every round, each live beam offers its top 2*width next tokens by
logprob (log_softmax of the processed logits: beam search is deterministic, temperature and
truncation do not apply), and the 2*width best by cumulative logprob are kept:

- a candidate ending in EOS (unless `ignore_eos`) or a stop token, once `min_tokens` are out,
  joins the finished set, scored `cumulative_logprob / length ** length_penalty` (length: its
  generated tokens, the final one included, as HF counts them); the `width` best are kept;
- the `width` best of the others become the next beams. A beam chosen k times forks k - 1
  children (`Scheduler.fork`: the block table is shared, only the partially filled last block is
  copied, on write); a beam not chosen is released at once.

The search ends when no beam runs, at `max_tokens` (the running beams finish with "length"), or
once `width` have finished and `early_stopping` says so: True at once; False when the best running
beam, scored at the current length, cannot beat the worst finished one; "never" when it cannot even
at `max_tokens` (for a positive length_penalty; else as False). The `n` best finished are sent then,
index 0 best, each as one event with its whole output; stop strings apply afterwards, in the
protocol core. Rounds run in lock-step: a beam computed while a sibling waits for the batch (or
was preempted) keeps its candidates until the sibling's arrive.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from protocol.engine_api import Event, FinishReason, SamplingParams, TokenLogprobs, Tokens

if TYPE_CHECKING:
    from engine.core import EngineCore
    from engine.requests import RequestState, SampleState


@dataclass(frozen=True)
class Candidate:
    """A beam extended by one token."""

    cumulative_logprob: float
    beam: int  # the extended beam's sample index
    token_id: int
    logprobs: TokenLogprobs | None  # the user-facing entry (raw logprobs), when asked for


@dataclass(frozen=True)
class Hypothesis:
    """A finished sequence."""

    score: float
    token_ids: tuple[int, ...]
    cumulative_logprob: float
    logprobs: tuple[TokenLogprobs, ...] | None
    finish_reason: FinishReason
    stop_reason: int | None


@dataclass(frozen=True)
class BeamView:
    """What the search reads of a live beam."""

    token_ids: Sequence[int]
    logprobs: Sequence[TokenLogprobs] | None


@dataclass
class Round:
    """What the engine must do to its beams after a round: extend (first in place, the rest as forks)
    and release; or, when `done`, release every beam and send `BeamSearch.results()`."""

    extend: list[tuple[int, list[Candidate]]] = field(default_factory=list)
    release: list[int] = field(default_factory=list)
    done: bool = False


class BeamSearch:
    """The beam-search state of one request: this round's candidates and the finished set."""

    def __init__(self, params: SamplingParams, max_tokens: int, eos_token_ids: Collection[int]) -> None:
        self.params = params
        self.width = params.n if params.best_of is None else params.best_of
        self.max_tokens = max_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.length = 0  # tokens every live beam has generated
        self.finished: list[Hypothesis] = []  # best first, at most `width`
        self._pending: dict[int, list[Candidate]] = {}
        self._next_index = 1

    @property
    def num_candidates(self) -> int:
        """Next tokens each beam offers."""
        return 2 * self.width

    def new_index(self) -> int:
        """A sample index for a forked beam (never reused within the request)."""
        index = self._next_index
        self._next_index += 1
        return index

    def offer(self, beam: int, candidates: list[Candidate]) -> None:
        self._pending[beam] = candidates

    def ready(self, live: Collection[int]) -> bool:
        """Every live beam has offered its candidates for this round."""
        return all(index in self._pending for index in live)

    def select(self, beams: Mapping[int, BeamView]) -> Round:
        """Close the round: rank the candidates, move the finished ones, choose the next beams."""
        self.length += 1
        ranked = sorted(
            (c for index in beams for c in self._pending.get(index, ())),
            key=lambda c: c.cumulative_logprob,
            reverse=True,
        )[: self.num_candidates]
        self._pending.clear()
        at_limit = self.length >= self.max_tokens
        running: list[Candidate] = []
        for candidate in ranked:
            stop = self._stop(candidate.token_id)
            if stop is None:
                running.append(candidate)
            else:
                reason, stop_reason = ("length", None) if at_limit else stop
                self._finish(candidate, beams[candidate.beam], reason, stop_reason)
        running = running[: self.width]
        if at_limit:
            for candidate in running:
                self._finish(candidate, beams[candidate.beam], "length", None)
            return Round(release=list(beams), done=True)
        if not running or self._should_stop(running[0]):
            return Round(release=list(beams), done=True)
        chosen: dict[int, list[Candidate]] = {}
        for candidate in running:
            chosen.setdefault(candidate.beam, []).append(candidate)
        return Round(extend=list(chosen.items()), release=[index for index in beams if index not in chosen])

    def results(self) -> list[Hypothesis]:
        """The n best finished sequences, best first."""
        return self.finished[: self.params.n]

    # ---- rules ----

    def _stop(self, token_id: int) -> tuple[FinishReason, int | None] | None:
        """Whether a beam ending in `token_id` at the current length finishes (as `finish_check`)."""
        p = self.params
        if self.length < p.min_tokens:
            return None
        if not p.ignore_eos and token_id in self.eos_token_ids:
            return "stop", None
        if token_id in p.stop_token_ids:
            return "stop", token_id
        return None

    def _score(self, cumulative_logprob: float, length: int) -> float:
        return cumulative_logprob / (length**self.params.length_penalty)

    def _finish(
        self, candidate: Candidate, beam: BeamView, reason: FinishReason, stop_reason: int | None
    ) -> None:
        logprobs = None
        if candidate.logprobs is not None:  # asked for: every token of the request has its entry
            logprobs = (*(beam.logprobs or ()), candidate.logprobs)
        self.finished.append(
            Hypothesis(
                self._score(candidate.cumulative_logprob, self.length),
                (*beam.token_ids, candidate.token_id),
                candidate.cumulative_logprob,
                logprobs,
                reason,
                stop_reason,
            )
        )
        self.finished.sort(key=lambda h: h.score, reverse=True)  # stable: earlier ones win ties
        del self.finished[self.width :]

    def _should_stop(self, best_running: Candidate) -> bool:
        if len(self.finished) < self.width:
            return False
        early_stopping = self.params.early_stopping
        if early_stopping is True:
            return True
        worst = self.finished[-1].score
        length = self.length
        if early_stopping == "never" and self.params.length_penalty > 0:
            length = self.max_tokens  # the longest it may grow: the best score a running beam can reach
        return worst >= self._score(best_running.cumulative_logprob, length)


def candidates(
    scores: torch.Tensor, raw_logprobs: torch.Tensor, beam: SampleState, k: int, logprobs: int | None
) -> list[Candidate]:
    """The top `k` extensions of one beam from its row of processed logprobs (impossible ones left out)."""
    from engine.sampler import token_logprobs

    values, ids = scores.topk(min(k, scores.shape[0]))
    out = []
    for value, token_id in zip(values.tolist(), ids.tolist(), strict=True):
        if value == float("-inf"):
            break
        entry = None if logprobs is None else token_logprobs(raw_logprobs, token_id, logprobs)
        out.append(Candidate(beam.cumulative_logprob + value, beam.index, token_id, entry))
    return out


class BeamSearchDriver:
    """Runs the beam-search rows of a step for `EngineCore` and applies each closed round to the
    scheduler (forks and releases) and to the logits processors."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def step(self, hidden: torch.Tensor, rows: list[tuple[int, RequestState, SampleState]]) -> list[Event]:
        core = self.core
        logits = core.runner.logits(hidden, [row for row, _, _ in rows])
        raw = torch.log_softmax(logits, dim=-1)  # user-facing logprobs are raw, as the sampler's
        self._process(logits, rows)
        scores = torch.log_softmax(logits, dim=-1)
        ready: dict[str, RequestState] = {}
        for i, (_, request, beam) in enumerate(rows):
            search = request.beam
            assert search is not None
            search.offer(
                beam.index,
                candidates(scores[i], raw[i], beam, search.num_candidates, request.params.logprobs),
            )
            core._count_prompt(request)
            if search.ready(request.samples):
                ready[request.request_id] = request
        events: list[Event] = []
        for request in ready.values():
            events.extend(self._close_round(request))
        return events

    def _process(self, logits: torch.Tensor, rows: list[tuple[int, RequestState, SampleState]]) -> None:
        """The logits processors (bias, masks, penalties), as for sampling; no temperature or truncation."""
        self.core.sampler.process(logits, [self.core._row(request, beam) for _, request, beam in rows])

    def _close_round(self, request: RequestState) -> list[Event]:
        search = request.beam
        assert search is not None
        views = {
            index: BeamView(beam.output_token_ids, beam.beam_logprobs)
            for index, beam in request.samples.items()
        }
        step = search.select(views)
        for index in step.release:
            self._release(request, request.samples.pop(index))
        if step.done:
            self.core.requests.pop(request.request_id, None)
            return self._results(request)
        for index, chosen in step.extend:
            parent = request.samples[index]
            for candidate in chosen[1:]:  # forks copy the parent before it moves on
                child = self._fork(request, parent, search.new_index())
                self._extend(child, candidate)
            self._extend(parent, chosen[0])
        return []

    def _fork(self, request: RequestState, parent: SampleState, index: int) -> SampleState:
        from engine.requests import SampleState

        seq = self.core.scheduler.fork(parent.seq, index)
        self.core.sampler.fork(parent.seq.seq_id, seq.seq_id)
        child = SampleState(
            seq,
            None,
            cumulative_logprob=parent.cumulative_logprob,
            sent_first_event=True,
            beam_logprobs=None if parent.beam_logprobs is None else list(parent.beam_logprobs),
        )
        request.samples[index] = child
        return child

    def _extend(self, beam: SampleState, candidate: Candidate) -> None:
        beam.output_token_ids.append(candidate.token_id)
        beam.cumulative_logprob = candidate.cumulative_logprob
        if candidate.logprobs is not None:
            if beam.beam_logprobs is None:
                beam.beam_logprobs = []
            beam.beam_logprobs.append(candidate.logprobs)
        self.core._generation_tokens_total += 1
        self.core.sampler.accept(beam.seq.seq_id, [candidate.token_id])

    def _release(self, request: RequestState, beam: SampleState) -> None:
        self.core.scheduler.finish(beam.seq)
        self.core.sampler.release(beam.seq.seq_id)

    def _results(self, request: RequestState) -> list[Event]:
        search = request.beam
        assert search is not None
        results = search.results()
        prompt_logprobs = None if request.prompt_logprobs is None else tuple(request.prompt_logprobs)
        events: list[Event] = []
        for index in range(request.params.n):
            if index < len(results):
                best = results[index]
                events.append(
                    Tokens(
                        request.request_id,
                        index,
                        best.token_ids,
                        request.num_prompt_tokens,
                        num_cached_tokens=request.num_cached_tokens or 0,
                        logprobs=best.logprobs,
                        prompt_logprobs=prompt_logprobs,
                        finish_reason=best.finish_reason,
                        stop_reason=best.stop_reason,
                        cumulative_logprob=best.cumulative_logprob,
                    )
                )
            else:  # fewer distinct sequences than n were possible (a tiny allowed vocabulary)
                events.append(
                    Tokens(
                        request.request_id,
                        index,
                        (),
                        request.num_prompt_tokens,
                        num_cached_tokens=request.num_cached_tokens or 0,
                        logprobs=() if request.params.logprobs is not None else None,
                        prompt_logprobs=prompt_logprobs,
                        finish_reason="length",
                        cumulative_logprob=0.0,
                    )
                )
        return events
