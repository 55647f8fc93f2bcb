"""Batched sampling: temperature, min-p, top-k and top-p masks, then one draw per row.

Order and semantics follow vLLM's v1 sampler: logits are divided by the temperature, min-p drops tokens
whose probability is below `min_p * max_prob`, top-k keeps the k largest logits (ties with the k-th kept),
top-p keeps the smallest set of most likely tokens whose mass reaches p (computed after top-k). Rows with
temperature 0 are greedy: the argmax of the raw logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (in place) all but the top-k / top-p tokens of each row with -inf."""
    vocab = logits.shape[-1]
    k_active = (top_k > 0) & (top_k < vocab)
    p_active = top_p < 1.0
    if bool(p_active.any()):
        # Full sort only when some row needs top-p, as vLLM does.
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        if bool(k_active.any()):
            kth_index = (vocab - top_k.clamp(1, vocab)).long().unsqueeze(1)
            kth_value = sorted_logits.gather(1, kth_index)
            kth_value.masked_fill_(~k_active.unsqueeze(1), float("-inf"))
            sorted_logits.masked_fill_(sorted_logits < kth_value, float("-inf"))
        cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always survives
        drop &= p_active.unsqueeze(1)
        sorted_logits.masked_fill_(drop, float("-inf"))
        return logits.scatter_(1, order, sorted_logits)
    if bool(k_active.any()):
        max_k = int(top_k[k_active].max())
        top_values = logits.topk(max_k, dim=-1).values
        kth_value = top_values.gather(1, (top_k.clamp(1, max_k) - 1).long().unsqueeze(1))
        kth_value.masked_fill_(~k_active.unsqueeze(1), float("-inf"))
        logits.masked_fill_(logits < kth_value, float("-inf"))
    return logits


def apply_sampling_masks(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Temperature-scaled logits [B, V] float32 with every token the filters drop set to -inf (a new tensor).

    Greedy rows (temperature 0) are scaled by 1; `sample` takes their argmax from the raw logits.
    top_k <= 0 or >= V, top_p >= 1 and min_p <= 0 switch the respective filter off for a row.
    """
    temperature = torch.where(temperature < GREEDY_TEMPERATURE, 1.0, temperature).to(logits.dtype)
    scaled = logits / temperature.unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = scaled.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1).to(probs.dtype)
        scaled.masked_fill_(probs < threshold, float("-inf"))
    return _apply_top_k_top_p(scaled, top_k, top_p)


def draw(masked_logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from softmax(masked_logits), by the exponential race `argmax(p / E)`, E ~ Exp(1).

    A row with its own generator draws its noise from it alone, so a seeded row samples the same token
    whatever the other rows of the batch are.
    """
    probs = masked_logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    seeded = [row for row, generator in enumerate(generators) if generator is not None]
    if len(seeded) < len(generators):
        noise.exponential_()
    for row in seeded:
        noise[row].exponential_(generator=generators[row])
    # A zero draw would turn a masked token's 0/0 into NaN, which argmax would pick.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


def sample_with(
    mask_fn: MaskFn,
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """`sample` with the masking step supplied, so the triton masking kernel shares the draw."""
    greedy_rows = temperature < GREEDY_TEMPERATURE
    greedy_tokens = logits.argmax(dim=-1)
    if bool(greedy_rows.all()):
        return greedy_tokens
    masked = mask_fn(logits, temperature, top_k, top_p, min_p)
    sampled = draw(masked, generators)
    return torch.where(greedy_rows.to(sampled.device), greedy_tokens, sampled)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Token ids [B] (int64) sampled from logits [B, V] float32 with per-row parameters [B].

    `generators[i]` (or None for the global generator) drives row i's randomness.
    """
    return sample_with(apply_sampling_masks, logits, temperature, top_k, top_p, min_p, generators)
