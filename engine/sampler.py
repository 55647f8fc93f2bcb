"""Batched sampling with per-request parameters.

One row of logits per sequence (or per verified position of one, see `SamplingRow.draft`).
Everything that reshapes the distribution before temperature runs as a pipeline of stateful
logits processors (`engine.processors`), in vLLM's order: allowed tokens, logit bias, bad words,
min_tokens (stop and EOS ids masked), penalties (repetition over prompt and output, frequency and
presence over output). Then greedy argmax for temperature 0, otherwise temperature, min_p, top_k,
top_p and a draw (`kernels.sample`).

The processors keep per-sequence state, so the engine tells the sampler about each sequence's
life by its key (`admit`, `accept`, `fork`, `preempt`, `release`). A row without a key is served
statelessly: admitted for the call from its prompt and output, released after it (tests, one-off use).

Logprobs are vLLM's default "raw logprobs": log_softmax of the model's logits *before* any of
the processing above, so they do not depend on temperature, penalties or bias.

Draws invert each row's cumulative distribution at one uniform number per row and step
(`kernels.torch_ops.sampling.draw`). A seeded sequence draws that number from its own
`torch.Generator`, so its output is the same whatever else shares the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import kernels
from engine.processors import Admission, LogitsPipeline, LogitsProcessor, RowRef, builtin_processors
from kernels.torch_ops.sampling import top_k_rows
from protocol.engine_api import SamplingParams, TokenLogprobs

_GREEDY_BELOW = 1e-5  # temperatures under this are greedy, as in vLLM


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits at this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: Collection[int] = ()
    generator: torch.Generator | None = None  # None: the sampler's shared generator
    # The admitted sequence this row belongs to; None: admitted just for this call (stateless use).
    key: str | None = None
    # Speculative verification: the proposed tokens between the sequence's output and this row's position.
    draft: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.params.temperature < _GREEDY_BELOW


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # raw logprob of each chosen token
    top_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # for rows that asked


class Sampler:
    def __init__(
        self, generator: torch.Generator | None = None, processors: Iterable[LogitsProcessor] | None = None
    ):
        self.generator = generator
        self.pipeline = LogitsPipeline(builtin_processors() if processors is None else processors)
        self._keys: set[str] = set()  # admitted sequences
        self._unkeyed = itertools.count()

    # ---- a sequence's life, by its key (the scheduler's seq_id) ----

    def admit(
        self,
        key: str,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        eos_token_ids: Collection[int] = (),
    ) -> None:
        """A new sequence; its rows may then carry `key`."""
        self._keys.add(key)
        self.pipeline.admit(key, Admission(params, prompt_token_ids, eos_token_ids))

    def accept(self, key: str, token_ids: Sequence[int]) -> None:
        """Tokens appended to the sequence's output this step."""
        self.pipeline.accept(key, token_ids)

    def fork(self, parent: str, child: str) -> None:
        """`child` continues from `parent`'s state (a beam, a best_of copy)."""
        self._keys.add(child)
        self.pipeline.fork(parent, child)

    def preempt(self, key: str) -> None:
        self.pipeline.preempt(key)

    def release(self, key: str) -> None:
        """The sequence finished, was aborted or dropped; harmless for a key never admitted."""
        if key in self._keys:
            self._keys.discard(key)
            self.pipeline.release(key)

    # ---- a step ----

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        """Pick one token per row of float32 `logits` [rows, vocab]. `logits` is modified in place."""
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        self.process(logits, rows)
        tokens = choose(logits, rows, self.generator)
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        tops = batched_token_logprobs(raw_logprobs, tokens, [row.params.logprobs for row in rows])
        return SampleResult(tokens.tolist(), chosen, tops)

    def process(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        """Run the logits processors over `logits` [rows, vocab] in place (everything before temperature)."""
        with self._refs(rows) as refs:
            self.pipeline.apply(logits, refs)

    def target_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """What a row's draw samples from: `logits` processed (in place), then tempered and truncated
        (min_p, top_k, top_p; dropped tokens -inf) into a new tensor. Its softmax is a sampled row's
        target distribution (for verifying drafts); a greedy row keeps scale 1, so its argmax is the
        greedy token."""
        self.process(logits, rows)
        return kernels.apply_sampling_masks(logits, *sampling_tensors(rows, logits.device))

    @contextmanager
    def _refs(self, rows: Sequence[SamplingRow]) -> Iterator[list[RowRef]]:
        """Each row's RowRef; rows without a key are admitted (with their output accepted) for the call."""
        refs: list[RowRef] = []
        unkeyed: list[str] = []
        for row in rows:
            key = row.key
            if key is None:
                key = f"\x00unkeyed-{next(self._unkeyed)}"
                unkeyed.append(key)
                self.admit(key, row.params, row.prompt_token_ids, row.eos_token_ids)
                if row.output_token_ids:
                    self.accept(key, row.output_token_ids)
            elif key not in self._keys:
                raise KeyError(f"sampling row for sequence {key!r}, which the sampler never admitted")
            refs.append(RowRef(key, tuple(row.draft)))
        try:
            yield refs
        finally:
            for key in unkeyed:
                self.release(key)


def sampling_tensors(
    rows: Sequence[SamplingRow], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperature (0 for greedy rows), top_k, top_p and min_p, as `kernels.sample` takes them."""
    temperature = torch.tensor([0.0 if row.greedy else row.params.temperature for row in rows], device=device)
    top_k = torch.tensor([row.params.top_k for row in rows], device=device)
    top_p = torch.tensor([row.params.top_p for row in rows], device=device)
    min_p = torch.tensor([row.params.min_p for row in rows], device=device)
    return temperature, top_k, top_p, min_p


def choose(
    logits: torch.Tensor, rows: Sequence[SamplingRow], generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy rows take the argmax; the others are tempered, truncated (min_p, top_k, top_p) and drawn
    by `kernels.sample` (triton on CUDA). A row without its own generator draws from `generator`."""
    generators = [row.generator or generator for row in rows]
    return kernels.sample(logits, *sampling_tensors(rows, logits.device), generators)


# ---- logprobs ----


def batched_token_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, counts: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """For each row of `logprobs` [B, V] whose count is not None: the chosen token's logprob and
    1-based rank, with the top-`count` alternatives (best first; a negative count asks for the whole
    vocabulary, as vLLM's -1). One topk for all the rows that asked; a rank costs a pass over the
    vocabulary only for a row whose chosen token is not among those top values."""
    asked = [i for i, k in enumerate(counts) if k is not None]
    result: list[TokenLogprobs | None] = [None] * len(counts)
    if not asked:
        return result
    token_ids = token_ids.to(logprobs.device).long()
    if len(asked) < logprobs.shape[0]:
        index = torch.tensor(asked, device=logprobs.device)
        logprobs, token_ids = logprobs.index_select(0, index), token_ids.index_select(0, index)
    vocab = logprobs.shape[1]
    wanted = [vocab if k < 0 else min(k, vocab) for k in (counts[i] for i in asked)]  # type: ignore[operator]
    chosen = logprobs.gather(1, token_ids[:, None])
    widest = max(wanted)
    top_values: list[list[float]] = [[] for _ in asked]
    top_ids: list[list[int]] = [[] for _ in asked]
    if widest:
        values, ids = top_k_rows(logprobs, widest)
        top_values, top_ids = values.tolist(), ids.tolist()
        # a chosen token at or above the row's last top value has every better token among the top
        ranks = (values > chosen).sum(dim=1) + 1
        outside = (chosen[:, 0] < values[:, -1]).nonzero()[:, 0]
    else:
        ranks = torch.ones(len(asked), dtype=torch.int64, device=logprobs.device)
        outside = torch.arange(len(asked), device=logprobs.device)
    if outside.numel():
        ranks[outside] = (logprobs[outside] > chosen[outside]).sum(dim=1) + 1
    rank_list, chosen_ids, chosen_values = ranks.tolist(), token_ids.tolist(), chosen[:, 0].tolist()
    for j, (i, k) in enumerate(zip(asked, wanted, strict=True)):
        top = tuple(zip(top_ids[j][:k], top_values[j][:k], strict=True))
        result[i] = TokenLogprobs(chosen_ids[j], chosen_values[j], rank_list[j], top)
    return result


def token_logprobs(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprobs:
    """The chosen token's logprob and 1-based rank, with the top-k alternatives (best first), from one row."""
    entry = batched_token_logprobs(logprobs[None], torch.tensor([token_id]), [k])[0]
    assert entry is not None
    return entry


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprobs]:
    """Logprob of each target token under the matching row of `logits` (the model's output one
    position earlier), with the top-k alternatives. The engine feeds a prompt in chunks of rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    entries = batched_token_logprobs(logprobs, torch.tensor(list(targets)), [k] * len(targets))
    return [entry for entry in entries if entry is not None]
