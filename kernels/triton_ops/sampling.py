"""Sampling masks (temperature, min-p, top-k, top-p) without a sort: one program per row.

Each filter keeps an upper set of the row's values, so the kept tokens are those at or above one
threshold. The top-k and top-p thresholds are found by bisection over an order-preserving integer key of
the float32 bits: 32 halvings pin the exact k-th largest value (or the exact smallest kept value for
top-p), with ties at the threshold kept. The draw itself is shared with the torch path, so per-row
torch generators keep working.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.torch_ops.sampling import GREEDY_TEMPERATURE, sample_with


@triton.jit
def _order_key(values):
    """int32 key with the order of the float32 values: negative floats get their magnitude bits flipped."""
    bits = values.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def sampling_mask_kernel(
    logits_ptr,
    out_ptr,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    vocab,
    logits_row_stride,
    out_row_stride,
    greedy_temperature,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    in_row = logits_ptr + row * logits_row_stride
    out_row = out_ptr + row * out_row_stride
    temperature = tl.load(temperature_ptr + row).to(tl.float32)
    temperature = tl.where(temperature < greedy_temperature, 1.0, temperature)
    top_k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    min_p = tl.load(min_p_ptr + row).to(tl.float32)
    cols = tl.arange(0, BLOCK)

    # Pass 1: scale by the temperature, write, and find the row's extremes.
    row_max = tl.full((), float("-inf"), tl.float32)
    low_key = tl.full((), 0x7FFFFFFF, tl.int64)
    high_key = tl.full((), -0x80000000, tl.int64)
    for start in range(0, vocab, BLOCK):
        mask = start + cols < vocab
        scaled = tl.load(in_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        tl.store(out_row + start + cols, scaled, mask=mask)
        row_max = tl.maximum(row_max, tl.max(scaled, axis=0))
        key = _order_key(scaled)
        low_key = tl.minimum(low_key, tl.min(tl.where(mask, key, 0x7FFFFFFF), axis=0))
        high_key = tl.maximum(high_key, tl.max(tl.where(mask, key, -0x80000000), axis=0))

    # min-p keeps p_i >= min_p * p_max, i.e. exp(x_i - max) >= min_p; min_p <= 0 keeps everything.

    # top-k: the largest key t with count(key >= t) >= k (bisection keeps count(>= lo) >= k > count(>= hi)).
    threshold = low_key
    if (top_k > 0) & (top_k < vocab):
        lo = low_key
        hi = high_key + 1
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            count = tl.zeros((), tl.int64)
            for start in range(0, vocab, BLOCK):
                mask = start + cols < vocab
                key = _order_key(tl.load(out_row + start + cols, mask=mask, other=float("-inf")))
                count += tl.sum((mask & (key >= mid)).to(tl.int64), axis=0)
            lo = tl.where(count >= top_k, mid, lo)
            hi = tl.where(count >= top_k, hi, mid)
        threshold = lo

    # top-p over the survivors so far: the largest key t whose survivors at or above t hold mass >= p.
    if top_p < 1.0:
        total = tl.zeros((), tl.float32)
        for start in range(0, vocab, BLOCK):
            mask = start + cols < vocab
            scaled = tl.load(out_row + start + cols, mask=mask, other=float("-inf"))
            weight = tl.exp(scaled - row_max)
            keep = mask & (_order_key(scaled) >= threshold) & (weight >= min_p)
            total += tl.sum(tl.where(keep, weight, 0.0), axis=0)
        lo = threshold
        hi = high_key + 1
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            mass = tl.zeros((), tl.float32)
            for start in range(0, vocab, BLOCK):
                mask = start + cols < vocab
                scaled = tl.load(out_row + start + cols, mask=mask, other=float("-inf"))
                weight = tl.exp(scaled - row_max)
                keep = mask & (_order_key(scaled) >= mid) & (weight >= min_p)
                mass += tl.sum(tl.where(keep, weight, 0.0), axis=0)
            lo = tl.where(mass >= top_p * total, mid, lo)
            hi = tl.where(mass >= top_p * total, hi, mid)
        threshold = lo

    # Final pass: everything below the threshold or under min-p becomes -inf.
    for start in range(0, vocab, BLOCK):
        mask = start + cols < vocab
        scaled = tl.load(out_row + start + cols, mask=mask, other=float("-inf"))
        drop = (_order_key(scaled) < threshold) | (tl.exp(scaled - row_max) < min_p)
        tl.store(out_row + start + cols, tl.where(drop, float("-inf"), scaled), mask=mask)


def apply_sampling_masks(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `kernels.torch_ops.sampling.apply_sampling_masks`."""
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty((batch, vocab), dtype=torch.float32, device=logits.device)
    if batch == 0:
        return out
    sampling_mask_kernel[(batch,)](
        logits,
        out,
        temperature,
        top_k,
        top_p,
        min_p,
        vocab,
        logits.stride(0),
        out.stride(0),
        GREEDY_TEMPERATURE,
        BLOCK=min(triton.next_power_of_2(vocab), 4096),
    )
    return out


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Same contract as `kernels.torch_ops.sampling.sample`, with the masks computed by the triton kernel."""
    return sample_with(apply_sampling_masks, logits, temperature, top_k, top_p, min_p, generators)
