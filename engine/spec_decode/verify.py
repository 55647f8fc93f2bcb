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
from dataclasses import dataclass, field, replace

import torch

from engine.sampler import Sampler, SamplingRow, batched_token_logprobs
from engine.spec_decode.rejection import greedy_accept, rejection_sample
from kernels.torch_ops.sampling import argmax_rows
from protocol.engine_api import TokenLogprobs


@dataclass(frozen=True)
class DraftedRow:
    """A sequence verified this step: its sampling row before the draft, and the draft."""

    row: SamplingRow
    draft: tuple[int, ...]


@dataclass
class Verified:
    token_ids: list[int]  # accepted draft tokens, then the token drawn after them
    logprobs: list[float]  # raw logprob of each, at its row
    top_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    num_accepted: int = 0  # draft tokens accepted (the last token is never a draft token)


def verify(sampler: Sampler, logits: torch.Tensor, drafted: Sequence[DraftedRow]) -> list[Verified]:
    """`logits` [sum(len(draft) + 1), V] float32, each sequence's rows in draft order (modified in
    place). A row without its own generator draws from the sampler's."""
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    positions = [replace(d.row, draft=d.draft[:i]) for d in drafted for i in range(len(d.draft) + 1)]
    if all(d.row.greedy for d in drafted):
        sampler.process(logits, positions)
        probs = None
    else:
        probs = sampler.target_logits(logits, positions).softmax(dim=-1)
    # greedy rows: the argmax of the processed logits, as the plain sampler takes it
    targets = argmax_rows(logits).tolist() if any(d.row.greedy for d in drafted) else []
    results: list[Verified] = []
    emitted_rows: list[int] = []
    emitted: list[int] = []
    start = 0
    for d in drafted:
        stop = start + len(d.draft) + 1
        if d.row.greedy:
            accepted, token = greedy_accept(targets[start:stop], d.draft)
        else:
            assert probs is not None
            generator = d.row.generator or sampler.generator
            accepted, token = rejection_sample(probs[start:stop], d.draft, generator)
        tokens = [*d.draft[:accepted], token]
        emitted_rows.extend(range(start, start + len(tokens)))
        emitted.extend(tokens)
        results.append(Verified(tokens, [], [], accepted))
        start = stop
    # logprobs of every emitted token at its own row, in one gather (and one top-k pass)
    index = torch.tensor(emitted_rows, device=logits.device)
    rows = raw_logprobs.index_select(0, index)
    ids = torch.tensor(emitted, device=logits.device)
    chosen = rows.gather(1, ids[:, None])[:, 0].tolist()
    counts = [
        d.row.params.logprobs for d, result in zip(drafted, results, strict=True) for _ in result.token_ids
    ]
    tops = batched_token_logprobs(rows, ids, counts)
    offset = 0
    for result in results:
        n = len(result.token_ids)
        result.logprobs, result.top_logprobs = chosen[offset : offset + n], tops[offset : offset + n]
        offset += n
    return results
