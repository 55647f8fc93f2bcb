"""Batched sampling: temperature, min-p, top-k and top-p masks, then one draw per row.

Order and semantics follow vLLM's v1 sampler: logits are divided by the temperature, min-p drops tokens
whose probability is below `min_p * max_prob`, top-k keeps the k largest logits (ties with the k-th kept),
top-p keeps the smallest set of most likely tokens whose mass reaches p (computed after top-k; tokens
tied with the last kept one are kept too). Rows with temperature 0 are greedy: the argmax of the raw
logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5

# top-p first looks for its cut among each row's 32 largest logits (found with `top_k_rows`, ~0.5 ms
# for 32 x 49152 where torch's topk of 256 takes 5.4); rows whose kept set reaches past them look
# among their 4096 largest, and only rows past those too pay for a sort of the whole vocabulary
# (`_largest`). SmolLM2-135M at temperature 1 with top_p 0.9 (`make bench-sampling`): of the rows
# past 32, three in four kept more than 256 tokens, so a 256 tier before 4096 cost more than it saved.
TOP_P_FIRST_CANDIDATES = 32
TOP_P_WIDE_CANDIDATES = 4096
_TORCH_TOPK_UP_TO = 256  # `_largest` takes torch's topk up to this k, numpy's partition past it

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


_TOP_K_CHUNK = 128  # vocabulary entries per chunk in `top_k_rows`


def top_k_rows(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.topk(k, dim=1)` (values, indices) of [B, V], faster for small k.

    Why: torch's CPU topk over a [32, 49152] batch measured ~1.8 ms for k=5, most of a logprobs
    step. The k largest of a row lie in the k chunks of the row with the largest maxima (a token
    outside them would be beaten by those k maxima), so one vectorised max per chunk and a topk over
    k chunks give the same values (ties may name other indices of equal value).
    """
    batch, vocab = values.shape
    if vocab % _TOP_K_CHUNK or k * _TOP_K_CHUNK * 4 > vocab:
        return values.topk(k, dim=1)
    chunks = values.view(batch, vocab // _TOP_K_CHUNK, _TOP_K_CHUNK)
    best = chunks.amax(dim=2).topk(k, dim=1).indices  # [B, k]
    candidates = chunks.gather(1, best[:, :, None].expand(batch, k, _TOP_K_CHUNK)).reshape(batch, -1)
    top, position = candidates.topk(k, dim=1)
    ids = best.gather(1, position // _TOP_K_CHUNK) * _TOP_K_CHUNK + position % _TOP_K_CHUNK
    return top, ids


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of each row of `values` [R, V] (overwritten), descending.

    Why numpy for wide k on the CPU: its partition and its SIMD sort (x86-simd-sort, AVX-512 or
    AVX2) took 0.33 ms a row for k = 4096 of 49152 and 1.0 ms for a whole row, where torch's topk
    and sort took 0.59 and 3.5; for narrow k (256) torch's topk is the faster (0.17 vs 0.28)."""
    vocab = values.shape[-1]
    if values.device.type != "cpu" or values.dtype != torch.float32 or k <= _TORCH_TOPK_UP_TO:
        return values.topk(k, dim=-1).values if k < vocab else values.sort(dim=-1, descending=True).values
    array = values.contiguous().numpy()  # the ndarray's own methods: kernels/ import only torch and triton
    if k < vocab:
        array.partition(vocab - k, axis=-1)
        array = array[:, vocab - k :].copy()
    array.sort(axis=-1)
    return torch.from_numpy(array[:, ::-1].copy())


def _top_p_threshold(
    candidates: torch.Tensor, row_max: torch.Tensor, total: torch.Tensor, top_k_threshold: torch.Tensor,
    top_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest kept value per row from `candidates` (a row's largest logits, descending), and whether the
    cut fell inside them. A token is kept when the mass of the tokens above it is still below p, i.e. the
    kept set ends at the first token where the running mass reaches p."""
    weights = torch.exp(candidates - row_max).masked_fill_(candidates < top_k_threshold, 0.0)
    reached = weights.cumsum_(dim=-1) >= top_p.unsqueeze(1) * total
    found = reached.any(dim=-1)
    cut = reached.to(torch.uint8).argmax(dim=-1, keepdim=True)
    return candidates.gather(1, cut), found


class _Cut(NamedTuple):
    """Where a row's top-k / top-p filters cut: tokens below `threshold` [B, 1] are dropped (-inf
    where no filter cuts). `candidates` / `candidate_ids` [B, W] are each row's W largest scaled
    logits (descending) and their token ids, W at least one more than any row's `limit` [B]."""

    threshold: torch.Tensor
    candidates: torch.Tensor | None = None
    candidate_ids: torch.Tensor | None = None
    limit: torch.Tensor | None = None


def _cut(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> _Cut:
    """The top-k / top-p threshold of each row of scaled `logits`; ties at a cut are kept."""
    vocab = logits.shape[-1]
    k_active = (top_k > 0) & (top_k < vocab)
    p_active = top_p < 1.0
    any_k, any_p = bool(k_active.any()), bool(p_active.any())
    if not (any_k or any_p):
        return _Cut(torch.full((logits.shape[0], 1), float("-inf"), device=logits.device))
    # a row whose kept set holds at most `limit` tokens is drawn among the candidates (`sample`); one
    # candidate more than any limit tells a row that keeps `limit` tokens from one that keeps more
    limit = torch.where(k_active, top_k, 0).clamp_min(TOP_P_FIRST_CANDIDATES).to(torch.int64)
    width = min(vocab, int(limit.max()) + 1)
    candidates, candidate_ids = top_k_rows(logits, width)  # descending
    kth = (top_k.clamp(1, width) - 1).long().unsqueeze(1)
    threshold = candidates.gather(1, kth).masked_fill_(~k_active.unsqueeze(1), float("-inf"))
    if any_p:
        row_max = candidates[:, :1]
        weights = (logits - row_max).clamp_min_(_EXP_FLOOR).exp_()  # see _EXP_FLOOR
        if any_k:
            weights.masked_fill_(logits < threshold, 0.0)
        total = weights.sum(dim=-1, keepdim=True)
        p_threshold, found = _top_p_threshold(candidates, row_max, total, threshold, top_p)
        # rows whose cut lies past the candidates look further, a few rows at a time
        searched = width
        for wider in (TOP_P_WIDE_CANDIDATES, vocab):
            missing = p_active & ~found
            if searched >= vocab or not bool(missing.any()):
                break
            searched = max(searched, min(wider, vocab))
            rows = missing.nonzero().flatten()
            more = _largest(logits[rows], searched)
            p_threshold[rows], found[rows] = _top_p_threshold(
                more, row_max[rows], total[rows], threshold[rows], top_p[rows]
            )
        # Rounding can leave the running mass a hair short of p: then every survivor is kept.
        use_p = (p_active & found).unsqueeze(1)
        threshold = torch.where(use_p, torch.maximum(threshold, p_threshold), threshold)
    return _Cut(threshold, candidates, candidate_ids, limit)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (in place) all but the top-k / top-p tokens of each row with -inf; ties at a cut are kept."""
    threshold = _cut(logits, top_k, top_p).threshold
    return logits.masked_fill_(logits < threshold, float("-inf"))


def _scaled(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits (a new tensor; greedy rows scaled by 1), min-p's drops set to -inf."""
    temperature = torch.where(temperature < GREEDY_TEMPERATURE, 1.0, temperature).to(logits.dtype)
    scaled = logits / temperature.unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = scaled.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1).to(probs.dtype)
        scaled.masked_fill_(probs < threshold, float("-inf"))
    return scaled


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
    return _apply_top_k_top_p(_scaled(logits, temperature, min_p), top_k, top_p)


def argmax_rows(values: torch.Tensor) -> torch.Tensor:
    """`values.argmax(dim=-1)` for [B, V], the first maximum of each row, as torch defines it.

    Why numpy on the CPU: torch's CPU argmax measured ~10x slower than numpy's on [32, 49152]
    float32 (1.24 vs 0.11 ms), and greedy decoding takes one per step. Same tie rule: numpy also
    returns the first maximal index.
    """
    if values.device.type == "cpu" and values.dtype == torch.float32 and values.dim() == 2 and values.shape[1]:
        return torch.from_numpy(values.detach().contiguous().numpy().argmax(axis=-1))
    return values.argmax(dim=-1)


def draw(masked_logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from softmax(masked_logits) (overwritten), by inverting the row's
    cumulative distribution at one uniform number.

    A row with its own generator draws its number from it alone, so a seeded row samples the same
    token whatever the other rows of the batch are. A token whose probability is 0 (masked to -inf)
    has an empty interval of the cumulative sum and is never picked.

    Why not the exponential race (`argmax(p / E)`, E ~ Exp(1), as vLLM's GPU sampler does): it
    needs a random number and a log per token; measured on the CPU for 32 x 49152 rows, 7.96 ms
    against 2.58 ms for this, most of a sampled step beside the model.
    """
    return _draw_masked(masked_logits, uniforms(generators, masked_logits.device))


def _draw_masked(
    logits: torch.Tensor, uniform: torch.Tensor, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """`draw` with the rows' uniform numbers given, from `logits` (overwritten, no new [B, V]
    tensor) with the tokens below `threshold` [B, 1] (if given) or at -inf dropped."""
    return invert_cumulative(_weights(logits, threshold).cumsum_(dim=-1), uniform)


# exp() is slow on the CPU where it underflows or meets -inf: 16 and 5.3 ms for 32 x 49152 values
# against 1.6 ms (Sleef's special-value paths), and a low temperature or a mask puts most of a row
# there. So differences from the row's max are clamped to where exp is still a normal float
# (e^-87 ~ 1.6e-38: such a token's weight is lost in any cumulative sum that has reached the max's
# 1), and dropped tokens are zeroed after.
_EXP_FLOOR = -87.0


def _weights(logits: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """exp(logits - row max) in place, 0 below `threshold` [B, 1] and at -inf (a processor's mask:
    the floor would otherwise give it e^-87, which a uniform number of 0 could land on)."""
    lowest = torch.finfo(logits.dtype).min
    floor = torch.full((logits.shape[0], 1), lowest, device=logits.device, dtype=logits.dtype)
    dropped = logits < (floor if threshold is None else threshold.clamp_min(lowest))
    weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).clamp_min_(_EXP_FLOOR).exp_()
    return weights.masked_fill_(dropped, 0.0) if bool(dropped.any()) else weights


def draw_from_weights(weights: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """`draw` from non-negative, unnormalised `weights` [B, V] (overwritten)."""
    return invert_cumulative(weights.cumsum_(dim=-1), uniforms(generators, weights.device))


def uniforms(generators: Sequence[torch.Generator | None], device: torch.device | str) -> torch.Tensor:
    """One uniform number in [0, 1) per row [B, 1] float32: from the row's own generator, or from
    the global one for rows without."""
    uniform = torch.empty(len(generators), 1, device=device)
    unseeded = [row for row, generator in enumerate(generators) if generator is None]
    if len(unseeded) == len(generators):
        return uniform.uniform_()
    if unseeded:
        uniform[unseeded] = torch.rand(len(unseeded), 1, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row].uniform_(generator=generator)
    return uniform


def invert_cumulative(cumulative: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The column where each row's cumulative weights [B, V] pass `uniform` [B, 1] x the row's
    total: a column whose weight is 0 is never the answer."""
    totals = cumulative[:, -1:]
    tokens = torch.searchsorted(cumulative, uniform * totals, right=True)[:, 0]
    past_end = tokens >= cumulative.shape[1]  # u x total rounded up to the total itself
    if bool(past_end.any()):
        last = torch.searchsorted(cumulative, totals, right=False)[:, 0]  # the last column with weight
        tokens = torch.where(past_end, last, tokens)
    return tokens


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
    greedy_tokens = argmax_rows(logits)
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

    `generators[i]` (or None for the global generator) drives row i's randomness. The tokens are
    distributed as `draw(apply_sampling_masks(...))` gives them; the work is not: a row whose kept
    set holds at most its limit (its top_k, and at least 32 tokens) is drawn among its candidates,
    in token-id order as the full row would be, which spares it the mask, the exponentials and the
    cumulative sum over the whole vocabulary (about a third of a sampled step on the CPU).
    """
    greedy_rows = temperature < GREEDY_TEMPERATURE
    greedy_tokens = argmax_rows(logits)
    if bool(greedy_rows.all()):
        return greedy_tokens
    scaled = _scaled(logits, temperature, min_p)
    cut = _cut(scaled, top_k, top_p)
    uniform = uniforms(generators, logits.device)
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    small = torch.zeros_like(greedy_rows)
    if cut.candidates is not None:
        assert cut.candidate_ids is not None and cut.limit is not None
        small = (cut.candidates >= cut.threshold).sum(dim=1) <= cut.limit
        rows = small.nonzero().flatten()
        if rows.numel():
            ids, order = cut.candidate_ids[rows].sort(dim=1)
            values = cut.candidates[rows].gather(1, order)
            weights = _weights(values, cut.threshold[rows])
            tokens[rows] = ids.gather(1, invert_cumulative(weights.cumsum_(dim=1), uniform[rows])[:, None])[:, 0]
    rows = (~small).nonzero().flatten()
    if rows.numel() == len(generators):  # every row over the whole vocabulary: no row copies
        tokens = _draw_masked(scaled, uniform, cut.threshold if cut.candidates is not None else None)
    elif rows.numel():
        tokens[rows] = _draw_masked(scaled[rows], uniform[rows], cut.threshold[rows])
    return torch.where(greedy_rows.to(tokens.device), greedy_tokens, tokens)
