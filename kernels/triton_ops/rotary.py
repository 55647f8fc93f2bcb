"""Rotary position embedding from a precomputed cos/sin cache (built by `kernels.rope`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotary_kernel(
    positions_ptr,
    x_ptr,
    cos_sin_ptr,
    token_stride,
    cos_sin_stride,
    num_heads,
    head_dim,
    half_rot,
    IS_NEOX: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
):
    """Rotate, in place, the heads of one token of x [num_tokens, num_heads*head_dim]."""
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    freq = tl.arange(0, HALF_BLOCK)
    freq_mask = freq < half_rot
    # cos/sin rounded to x's dtype first, as the torch path (and HF) compute in the activation dtype.
    cos = tl.load(cos_sin_ptr + position * cos_sin_stride + freq, mask=freq_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + position * cos_sin_stride + half_rot + freq, mask=freq_mask, other=0.0)
    cos = cos.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    sin = sin.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    heads = tl.arange(0, HEADS_BLOCK)
    mask = (heads < num_heads)[:, None] & freq_mask[None, :]
    if IS_NEOX:
        first, second = freq, freq + half_rot
    else:
        first, second = 2 * freq, 2 * freq + 1
    base = x_ptr + token * token_stride + heads[:, None] * head_dim
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(base + first[None, :], (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + second[None, :], (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def _rotate(positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int, is_neox: bool):
    rows = x.reshape(x.shape[0], -1).clone(memory_format=torch.contiguous_format)
    num_heads = rows.shape[1] // head_dim
    half_rot = cos_sin_cache.shape[-1] // 2
    rotary_kernel[(rows.shape[0],)](
        positions,
        rows,
        cos_sin_cache,
        rows.stride(0),
        cos_sin_cache.stride(0),
        num_heads,
        head_dim,
        half_rot,
        IS_NEOX=is_neox,
        HEADS_BLOCK=triton.next_power_of_2(num_heads),
        HALF_BLOCK=triton.next_power_of_2(half_rot),
    )
    return rows.view(x.shape)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.torch_ops.rotary.rotary_embedding`."""
    positions = positions.reshape(-1)
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    return (
        _rotate(positions, q, cos_sin_cache, head_dim, is_neox),
        _rotate(positions, k, cos_sin_cache, head_dim, is_neox),
    )
