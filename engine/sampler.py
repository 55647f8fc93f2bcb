"""Batched sampling with per-request parameters.

One row of logits per sequence. Processing order follows vLLM: allowed tokens, logit bias, bad
words, min_tokens (stop and EOS ids masked), penalties (repetition over prompt and output,
frequency and presence over output), then greedy argmax for temperature 0, otherwise
temperature, min_p, top_k, top_p and a draw (`kernels.sample`).

Logprobs are vLLM's default "raw logprobs": log_softmax of the model's logits *before* any of
the processing above, so they do not depend on temperature, penalties or bias.

Draws use the exponential race (argmax of p / Exp(1) noise), which needs exactly one noise
vector per row and step. A seeded sequence draws its noise from its own `torch.Generator`,
so its output is the same whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

import kernels
from protocol.engine_api import SamplingParams, TokenLogprobs

_GREEDY_BELOW = 1e-5  # temperatures under this are greedy, as in vLLM


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence at this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: Collection[int] = ()
    generator: torch.Generator | None = None  # None: the sampler's shared generator

    @property
    def greedy(self) -> bool:
        return self.params.temperature < _GREEDY_BELOW


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # raw logprob of each chosen token
    top_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # for rows that asked


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        """Pick one token per row of float32 `logits` [rows, vocab]. `logits` is modified in place."""
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        process_logits(logits, rows)
        tokens = choose(logits, rows, self.generator)
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        token_list = tokens.tolist()
        tops: list[TokenLogprobs | None] = []
        for i, row in enumerate(rows):
            k = row.params.logprobs
            tops.append(None if k is None else token_logprobs(raw_logprobs[i], token_list[i], k))
        return SampleResult(token_list, chosen, tops)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Everything that reshapes the distribution before temperature, in vLLM's order."""
    apply_allowed_token_ids(logits, rows)
    apply_logit_bias(logits, rows)
    apply_bad_words(logits, rows)
    apply_min_tokens(logits, rows)
    apply_penalties(logits, rows)


def choose(
    logits: torch.Tensor, rows: Sequence[SamplingRow], generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy rows take the argmax; the others are tempered, truncated (min_p, top_k, top_p) and drawn
    by `kernels.sample` (triton on CUDA). A row without its own generator draws from `generator`."""
    device = logits.device
    params = [row.params for row in rows]
    temperature = torch.tensor([0.0 if row.greedy else row.params.temperature for row in rows], device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    generators = [row.generator or generator for row in rows]
    return kernels.sample(logits, temperature, top_k, top_p, min_p, generators)


# ---- individual processors (each modifies `logits` in place) ----


def apply_allowed_token_ids(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        allowed = row.params.allowed_token_ids
        if allowed is not None:
            mask = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            mask[list(allowed)] = False
            logits[i].masked_fill_(mask, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            ids = torch.tensor(list(bias.keys()), device=logits.device)
            values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
            logits[i].index_add_(0, ids, values)


def apply_bad_words(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Ban a bad word's last token whenever the output so far ends with the rest of it."""
    for i, row in enumerate(rows):
        words = row.params.bad_words_token_ids
        if not words:
            continue
        output = list(row.output_token_ids)
        banned = []
        for word in words:
            prefix = list(word[:-1])
            if not prefix or (len(output) >= len(prefix) and output[len(output) - len(prefix) :] == prefix):
                banned.append(word[-1])
        if banned:
            logits[i, banned] = float("-inf")


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Until `min_tokens` are out, no token may end the sequence (stop ids, and EOS unless ignored)."""
    for i, row in enumerate(rows):
        if len(row.output_token_ids) >= row.params.min_tokens:
            continue
        stops = set(row.params.stop_token_ids)
        if not row.params.ignore_eos:
            stops.update(row.eos_token_ids)
        if stops:
            logits[i, sorted(stops)] = float("-inf")


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition (prompt + output, divides positive logits), frequency and presence (output only)."""
    active = [
        i
        for i, row in enumerate(rows)
        if row.params.repetition_penalty != 1.0 or row.params.frequency_penalty or row.params.presence_penalty
    ]
    if not active:
        return
    vocab, device = logits.shape[1], logits.device
    for i in active:
        p = rows[i].params
        counts = torch.bincount(
            torch.tensor(list(rows[i].output_token_ids), dtype=torch.long), minlength=vocab
        )
        counts = counts[:vocab].to(device=device, dtype=logits.dtype)
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            prompt = [t for t in rows[i].prompt_token_ids if 0 <= t < vocab]
            if prompt:
                seen[prompt] = True
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalised, row))
        if p.frequency_penalty:
            row.sub_(p.frequency_penalty * counts)
        if p.presence_penalty:
            row.sub_(p.presence_penalty * (counts > 0).to(logits.dtype))


# ---- logprobs ----


def token_logprobs(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprobs:
    """The chosen token's logprob and 1-based rank, with the top-k alternatives (best first), from one row."""
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum()) + 1
    top: tuple[tuple[int, float], ...] = ()
    if k != 0:  # a negative k asks for the whole vocabulary, as vLLM's -1
        vocab = logprobs.shape[0]
        values, ids = logprobs.topk(vocab if k < 0 else min(k, vocab))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(token_id, float(chosen), rank, top)


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprobs]:
    """Logprob of each target token under the matching row of `logits` (the model's output one
    position earlier), with the top-k alternatives. The engine feeds a prompt in chunks of rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [token_logprobs(logprobs[row], token, k) for row, token in enumerate(targets)]
