"""Continuous batching: which sequences run this step, and how many of their tokens.

There are no separate prefill and decode phases (as in vLLM v1): every sequence has a number of
computed tokens, and each step gives it a share of a token budget to close the gap to its known
tokens. A decoding sequence needs one token; a new prompt takes as many as the budget allows, so a
long prompt is prefilled in chunks while other sequences keep decoding.

Order: running sequences first (they hold KV blocks; decodes before unfinished prefills), then
waiting ones by (priority, arrival). When the cache runs out of blocks, the running sequence that
would be served last is preempted: its blocks are freed and it goes back to the waiting queue to be
recomputed later (its sampled tokens are kept, so its output is unchanged).

Blocks are published to the prefix cache when they are allocated, so the n samples of a request
admitted in one step compute their shared prompt once (the first sample's chunk fills the blocks,
the others attach to them).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import Enum

from engine.kv_cache import KVCacheManager, MediaSpan
from protocol.engine_api import MediaInput, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request: `n` samples share a prompt, and its blocks through the prefix cache."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams | None  # None: prefill-only work that samples nothing (pooling)
    priority: int = 0
    arrival: int | None = None
    salt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: Status = Status.WAITING
    first_scheduled: bool = False
    num_preemptions: int = 0
    read_prefix_cache: bool = True  # False while every prompt position's output is needed (prompt logprobs)
    lora: int | None = None  # the LoRA adapter it runs (engine.lora; its id is also in `salt`)
    prefill_only: bool = False  # answered once its prompt is computed (pooling, prompt scoring), never sampled
    media: tuple[MediaInput, ...] = ()  # images (...) on placeholder runs of the prompt

    @property
    def media_spans(self) -> list[MediaSpan]:
        """Its media items as the prefix cache keys them: (first, end position, content hash)."""
        return [(item.offset, item.offset + item.length, item.hash.encode()) for item in self.media]

    @property
    def seq_id(self) -> str:
        return f"{self.request_id}\x00{self.index}"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens at positions [start, stop) without copying the whole sequence (a decode reads one)."""
        prompt = len(self.prompt_token_ids)
        if start >= prompt:
            return self.output_token_ids[start - prompt : stop - prompt]
        if stop <= prompt:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - prompt]


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int
    samples: bool = False  # the chunk reaches the end of the known tokens: a new token is sampled
    # speculative decoding: proposed tokens computed after the known ones, verified after the step
    # (engine.spec_decode); `num_tokens` counts them
    draft: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.samples = self.start + self.num_tokens - len(self.draft) == self.seq.num_tokens

    def input_token_ids(self) -> list[int]:
        """The token ids this chunk feeds the model: known tokens, then the draft."""
        known = self.seq.token_ids(self.start, self.start + self.num_tokens - len(self.draft))
        return known + list(self.draft) if self.draft else known


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        long_prefill_token_threshold: int = 0,
        prefill_limit: Callable[[int, int], int] | None = None,
        max_loras: int | None = None,
    ) -> None:
        """`prefill_limit(num_decodes, load)`: the most prompt tokens a step may prefill beside that
        many decoding sequences while `load` sequences run or wait (at most `max_num_seqs`: those
        that will decode together)
        (`engine.step_budget.StepBudget.prefill_tokens`); None: the whole budget. `max_loras`: the
        most LoRA adapters the running sequences may use at once (a step runs them all); a waiting
        sequence of another adapter waits, and the ones behind it may go first."""
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.prefill_limit = prefill_limit
        self.max_loras = max_loras
        self.running: list[Sequence] = []
        self._waiting: list[tuple[int, int, int, Sequence]] = []
        self._counter = itertools.count()
        self.num_preemptions = 0
        # Prefix cache statistics in tokens, as vLLM reports them: counted once per sequence, when
        # it is first scheduled (not when it waits for blocks, nor when it comes back from preemption).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queue management ----

    @property
    def num_waiting(self) -> int:
        return sum(1 for *_, s in self._waiting if s.status is Status.WAITING)

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens of the sequences waiting to be scheduled (admission control)."""
        return sum(len(s.prompt_token_ids) for *_, s in self._waiting if s.status is Status.WAITING)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or any(s.status is Status.WAITING for *_, s in self._waiting)

    def add(self, seq: Sequence) -> None:
        if seq.arrival is None:
            seq.arrival = next(self._counter)
        seq.status = Status.WAITING
        heapq.heappush(self._waiting, (seq.priority, seq.arrival, next(self._counter), seq))

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its blocks in the same step."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        seq.status = Status.FINISHED
        self.kv.free(seq.seq_id)

    def fork(self, parent: Sequence, index: int) -> Sequence:
        """A copy of `parent` as sample `index` (a beam extended two ways), computed as far as it is.

        A running parent's blocks are shared with the child (`KVCacheManager.fork`) and the child
        runs at once, even past `max_num_seqs` (a beam-search request grows from one sequence to its
        width); a parent without blocks (preempted) sends the child to the waiting queue, to be
        recomputed (its prompt's full blocks still hit the prefix cache)."""
        child = Sequence(
            parent.request_id,
            index,
            parent.prompt_token_ids,
            parent.params,
            parent.priority,
            arrival=parent.arrival,
            salt=parent.salt,
            output_token_ids=list(parent.output_token_ids),
            num_cached_tokens=parent.num_cached_tokens,
            first_scheduled=parent.first_scheduled,
            read_prefix_cache=parent.read_prefix_cache,
            lora=parent.lora,
            media=parent.media,
        )
        if parent.status is Status.RUNNING:
            self.kv.fork(parent.seq_id, child.seq_id, parent.num_computed_tokens)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = Status.RUNNING
            self.running.append(child)
        else:
            self.add(child)
        return child

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    # ---- the step ----

    def _chunk(self, missing: int, budget: int) -> int:
        want = min(missing, budget)
        if self.long_prefill_token_threshold:
            want = min(want, self.long_prefill_token_threshold)
        return want

    def _publish(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the blocks this chunk fills, so sequences scheduled after it can share them now."""
        if self.kv.has_uncommitted(seq.seq_id, num_tokens):
            self.kv.commit(seq.seq_id, seq.all_token_ids, num_tokens)

    def schedule(self, drafts: Mapping[str, Seq[int]] | None = None) -> SchedulerOutput:
        """`drafts`: proposed tokens by seq_id for decoding sequences (speculative decoding); each
        goes into its sequence's chunk as far as the token budget and free blocks allow (a draft
        never preempts), and only its verified tokens ever reach the prefix cache."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()

        # 1. Running sequences, decodes first (one token each, so a long prefill chunk cannot starve
        #    them), then unfinished prefills; each in arrival order, asking for what it is missing.
        #    Once the decodes are in, the prefill share of the step may be limited (`prefill_limit`).
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for position, seq in enumerate(decoding + prefilling):
            if position == len(decoding) and self.prefill_limit is not None:
                budget = min(budget, self.prefill_limit(_rows(chunks), self._load()))
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this step to make room for another
            draft = tuple(drafts.get(seq.seq_id, ())) if drafts and position < len(decoding) else ()
            want = self._chunk(seq.num_tokens - seq.num_computed_tokens + len(draft), budget)
            if want <= 0:
                continue
            draft = draft[: want - 1]
            if draft and not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + want):
                draft, want = (), 1  # no free blocks for the draft: decode without it
            while not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + want):
                victim = max(
                    (s for s in self.running if id(s) not in scheduled),
                    key=lambda s: (s.priority, s.arrival),
                )
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self._publish(seq, seq.num_computed_tokens + want - len(draft))
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, want, draft=draft))
            scheduled.add(id(seq))
            budget -= want

        # 2. Waiting sequences, best (priority, arrival) first, while budget, seats and blocks last.
        if not prefilling and self.prefill_limit is not None:  # the limit was not applied above
            budget = min(budget, self.prefill_limit(_rows(chunks), self._load()))
        if not preempted:
            # a seat is a running sequence with tokens to compute: a beam waiting for its siblings'
            # round (engine.beam_search) does not hold one, or they could wait for each other forever
            seats = sum(1 for s in self.running if s.num_tokens > s.num_computed_tokens)
            adapters = {s.lora for s in self.running if s.lora is not None}
            passed_over: list[tuple[int, int, int, Sequence]] = []  # another adapter than the running ones
            while self._waiting and budget > 0 and seats < self.max_num_seqs:
                *_, seq = self._waiting[0]
                if seq.status is not Status.WAITING:
                    heapq.heappop(self._waiting)
                    continue
                if self._adapter_full(seq, adapters):
                    passed_over.append(heapq.heappop(self._waiting))
                    continue
                tokens = seq.all_token_ids
                computed = self.kv.start(
                    seq.seq_id, tokens, seq.salt, seq.read_prefix_cache, seq.media_spans if seq.media else ()
                )
                want = self._chunk(seq.num_tokens - computed, budget)
                if not self.kv.allocate(seq.seq_id, computed + want):
                    self.kv.free(seq.seq_id)
                    break
                heapq.heappop(self._waiting)
                if not seq.first_scheduled:
                    seq.first_scheduled = True
                    seq.num_cached_tokens = computed
                    self.prefix_cache_queries += seq.num_tokens
                    self.prefix_cache_hits += computed
                seq.num_computed_tokens = computed
                seq.status = Status.RUNNING
                self.running.append(seq)
                if seq.lora is not None:
                    adapters.add(seq.lora)
                seats += 1
                self._publish(seq, computed + want)
                chunks.append(ScheduledChunk(seq, computed, want))
                budget -= want
            for entry in passed_over:
                heapq.heappush(self._waiting, entry)

        return SchedulerOutput(chunks, preempted)

    def _adapter_full(self, seq: Sequence, adapters: set[int]) -> bool:
        """Whether `seq` needs an adapter beyond the `max_loras` the running sequences already use."""
        return (
            seq.lora is not None
            and self.max_loras is not None
            and seq.lora not in adapters
            and len(adapters) >= self.max_loras
        )

    def _load(self) -> int:
        """Sequences running or waiting, at most `max_num_seqs`: those that will decode together."""
        waiting = sum(1 for *_, s in self._waiting if s.status is Status.WAITING)
        return min(len(self.running) + waiting, self.max_num_seqs)

    def advance(self, chunks: Seq[ScheduledChunk]) -> None:
        """Record that the scheduled tokens were computed (their blocks were published when scheduled)."""
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens - len(chunk.draft)  # see accept_draft
            self._publish(seq, seq.num_computed_tokens)

    def accept_draft(self, seq: Sequence, num_accepted: int) -> None:
        """After verification (the accepted tokens already appended to the output): their keys and
        values, computed with the draft, stand. Those of rejected tokens are simply overwritten when
        those positions are computed again; their blocks were never published."""
        if seq.status is Status.RUNNING and num_accepted:
            seq.num_computed_tokens += num_accepted
            self._publish(seq, seq.num_computed_tokens)


def _rows(chunks: Seq[ScheduledChunk]) -> int:
    """Rows the decodes scheduled so far add to a step (a drafted decode adds one per token)."""
    return sum(chunk.num_tokens for chunk in chunks)
