"""Writing new keys and values into the paged KV cache (layout in `kernels.kv_cache`)."""

from __future__ import annotations

import torch


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the caches at `slot_mapping`, in place."""
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    key = key.reshape(-1, num_kv_heads, head_dim).to(key_cache.dtype)
    value = value.reshape(-1, num_kv_heads, head_dim).to(value_cache.dtype)
    slots = slot_mapping.reshape(-1).long()
    padding = slots < 0
    if bool(padding.any()):
        keep = ~padding
        slots, key, value = slots[keep], key[keep], value[keep]
    flat_keys.index_copy_(0, slots, key)
    flat_values.index_copy_(0, slots, value)


def copy_blocks(
    key_cache: torch.Tensor, value_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor
) -> None:
    """Copy whole blocks `src[i] -> dst[i]` of one layer's caches, in place (a forked beam's copy on write).

    No dst may also be a src (`engine.kv_cache.KVCacheManager.take_copies` batches them so)."""
    src, dst = src.long(), dst.long()
    key_cache.index_copy_(0, dst, key_cache.index_select(0, src))
    value_cache.index_copy_(0, dst, value_cache.index_select(0, src))
