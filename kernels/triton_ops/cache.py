"""Writing new keys and values into the paged KV cache (layout in `kernels.kv_cache`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    key_token_stride,
    value_token_stride,
    key_slot_stride,
    value_slot_stride,
    token_width,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token: nothing to write
        return
    cols = tl.arange(0, BLOCK)
    mask = cols < token_width
    key = tl.load(key_ptr + token * key_token_stride + cols, mask=mask)
    value = tl.load(value_ptr + token * value_token_stride + cols, mask=mask)
    tl.store(key_cache_ptr + slot * key_slot_stride + cols, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(
        value_cache_ptr + slot * value_slot_stride + cols, value.to(value_cache_ptr.dtype.element_ty), mask=mask
    )


def _token_rows(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    rows = x.reshape(num_tokens, -1)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as `kernels.torch_ops.cache.reshape_and_cache`."""
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous")
    num_tokens = slot_mapping.numel()
    if num_tokens == 0:
        return
    keys, values = _token_rows(key, num_tokens), _token_rows(value, num_tokens)
    token_width = key_cache.shape[2] * key_cache.shape[3]
    reshape_and_cache_kernel[(num_tokens,)](
        keys,
        values,
        key_cache,
        value_cache,
        slot_mapping.reshape(-1),
        keys.stride(0),
        values.stride(0),
        key_cache.stride(1),
        value_cache.stride(1),
        token_width,
        BLOCK=triton.next_power_of_2(token_width),
    )


@triton.jit
def copy_blocks_kernel(key_cache_ptr, value_cache_ptr, src_ptr, dst_ptr, block_numel, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    part = tl.program_id(1).to(tl.int64)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    mask = cols < block_numel
    key = tl.load(key_cache_ptr + src * block_numel + cols, mask=mask)
    tl.store(key_cache_ptr + dst * block_numel + cols, key, mask=mask)
    value = tl.load(value_cache_ptr + src * block_numel + cols, mask=mask)
    tl.store(value_cache_ptr + dst * block_numel + cols, value, mask=mask)


def copy_blocks(
    key_cache: torch.Tensor, value_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> None:
    """Same contract as `kernels.torch_ops.cache.copy_blocks`."""
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous")
    num_pairs = src.numel()
    if num_pairs == 0:
        return
    block_numel = key_cache[0].numel()
    chunk = min(4096, triton.next_power_of_2(block_numel))
    grid = (num_pairs, triton.cdiv(block_numel, chunk))
    copy_blocks_kernel[grid](
        key_cache, value_cache, src.reshape(-1), dst.reshape(-1), block_numel, BLOCK=chunk
    )
