"""Verification: one forward pass gave k + 1 logits rows for a sequence with k draft tokens; decide
which draft tokens stand and which token follows them.

Row i of a drafted sequence is the model's output after its accepted tokens plus `draft[:i]`, so it
is processed (allowed tokens, bias, bad words, min_tokens, penalties) as if the draft up to there
were already output; then greedy rows accept the longest prefix of the draft that matches the
argmax and add the model's own next token (the same tokens plain decoding would produce), and
sampled rows go through rejection sampling (`engine.spec_decode.rejection`), which keeps each token
distributed exactly as plain sampling draws it. Logprobs are the raw logprobs of each emitted
token at its own row, as plain decoding reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import kernels
from engine.sampler import SamplingRow, process_logits, token_logprobs
from engine.spec_decode.rejection import greedy_accept, rejection_sample
from kernels.torch_ops.sampling import argmax_rows
from protocol.engine_api import TokenLogprobs


@dataclass(frozen=True)
class DraftedRow:
    """A sequence verified this step: its sampling context before the draft, and the draft."""

    row: SamplingRow
    draft: tuple[int, ...]


@dataclass
class Verified:
    token_ids: list[int]  # accepted draft tokens, then the token drawn after them
    logprobs: list[float]  # raw logprob of each, at its row
    top_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    num_accepted: int = 0  # draft tokens accepted (the last token is never a draft token)


def verify(
    logits: torch.Tensor, drafted: Sequence[DraftedRow], generator: torch.Generator | None
) -> list[Verified]:
    """`logits` [sum(len(draft) + 1), V] float32, each sequence's rows in draft order (modified in
    place). A row without its own generator draws from `generator`."""
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    positions = [
        SamplingRow(
            d.row.params,
            d.row.prompt_token_ids,
            [*d.row.output_token_ids, *d.draft[:i]],
            d.row.eos_token_ids,
            d.row.generator,
        )
        for d in drafted
        for i in range(len(d.draft) + 1)
    ]
    probs = _target_probs(logits, positions)
    targets = argmax_rows(logits).tolist() if any(d.row.greedy for d in drafted) else None
    results: list[Verified] = []
    start = 0
    for d in drafted:
        stop = start + len(d.draft) + 1
        if d.row.greedy:
            assert targets is not None
            accepted, token = greedy_accept(targets[start:stop], d.draft)
        else:
            assert probs is not None
            accepted, token = rejection_sample(probs[start:stop], d.draft, d.row.generator or generator)
        tokens = [*d.draft[:accepted], token]
        rows = raw_logprobs[start : start + len(tokens)]
        chosen = rows.gather(1, torch.tensor(tokens, device=rows.device)[:, None])[:, 0].tolist()
        k = d.row.params.logprobs
        tops = [None if k is None else token_logprobs(rows[i], t, k) for i, t in enumerate(tokens)]
        results.append(Verified(tokens, chosen, tops, accepted))
        start = stop
    return results


def _target_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor | None:
    """Process `logits` in place (what greedy takes the argmax of), and return the distribution the
    plain sampler draws from for the sampled rows (None when every row is greedy)."""
    process_logits(logits, rows)
    if all(row.greedy for row in rows):
        return None
    device = logits.device
    params = [row.params for row in rows]
    temperature = torch.tensor([0.0 if row.greedy else row.params.temperature for row in rows], device=device)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    return kernels.apply_sampling_masks(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
