"""Rejection sampling for a point-mass proposal: keeps the target distribution exact.

The n-gram proposer drafts one token per position with certainty (q = a point mass on the draft
token d). Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) then accepts d at position
i with probability min(1, p_i(d) / q(d)) = p_i(d), and on rejection draws from the residual
max(p_i - q, 0), which is p_i with d removed and renormalised. Each emitted token is therefore
distributed exactly as p_i: P(d) = p_i(d), P(x != d) = (1 - p_i(d)) p_i(x) / (1 - p_i(d)) = p_i(x).
If every draft token is accepted, a bonus token is drawn from the row after the last draft token.

`p` here is the distribution the plain sampler draws from: the processed logits, tempered and
truncated (top-k, top-p, min-p), softmaxed. Plain torch: a handful of small ops per sequence, on
rows that are already on the device; no kernel of its own is worth it at k <= ~8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.torch_ops.sampling import draw_from_weights


def rejection_sample(
    probs: torch.Tensor, draft: Sequence[int], generator: torch.Generator | None
) -> tuple[int, int]:
    """For one sequence: `probs` [k + 1, V] (row i: the target distribution at draft position i),
    `draft` its k tokens. Returns (number of draft tokens accepted, the token drawn after them:
    a replacement for the first rejected one, or the bonus token)."""
    k = len(draft)
    if k:
        drafted = torch.tensor(draft, device=probs.device)
        accept_prob = probs[:k].gather(1, drafted[:, None])[:, 0]
        uniforms = torch.rand(k, generator=generator, device=probs.device, dtype=probs.dtype)
        rejected = (uniforms >= accept_prob).tolist()
        accepted = rejected.index(True) if True in rejected else k
    else:
        accepted = 0
    row = probs[accepted]
    if accepted < k:  # the residual: p without the rejected token, renormalised (by the draw)
        residual = row.clone()
        residual[draft[accepted]] = 0.0
        if bool(residual.sum() > 0):  # else p was (numerically) all on d: keep p, which gives d
            row = residual
    return accepted, draw_one(row, generator)


def draw_one(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalised `probs` [V], as the plain sampler draws (a token of
    probability 0 is never picked)."""
    return int(draw_from_weights(probs[None].clone(), [generator])[0])


def greedy_accept(targets: Sequence[int], draft: Sequence[int]) -> tuple[int, int]:
    """Greedy verification: `targets` [k + 1] are the argmax tokens of each row. Accept the longest
    prefix of `draft` that equals them, then the model's own token after it."""
    accepted = 0
    while accepted < len(draft) and draft[accepted] == targets[accepted]:
        accepted += 1
    return accepted, targets[accepted]
