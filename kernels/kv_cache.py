"""The paged KV-cache layout every attention kernel here reads and `reshape_and_cache` writes.

key_cache and value_cache are each [num_blocks, block_size, num_kv_heads, head_dim]. A sequence's token at
position p lives in block `block_table[p // block_size]` at offset `p % block_size`, i.e. at flat slot
`block_id * block_size + offset`; slot -1 marks a padding token that is not written.
"""

from __future__ import annotations

import importlib

import torch

from kernels.dispatch import use_triton
from kernels.torch_ops import cache


def allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-filled (key_cache, value_cache) pair for one layer.

    Zero-filled rather than empty: the batched decode path reads whole blocks and gives the rows past a
    sequence's end zero weight, and 0 * NaN from uninitialised memory would still poison the sum.
    """
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (
        torch.zeros(shape, dtype=dtype, device=device),
        torch.zeros(shape, dtype=dtype, device=device),
    )


def slot_mapping(block_table: list[int], positions: range | list[int], block_size: int) -> list[int]:
    """Flat cache slots of `positions` of one sequence, given its block table (a small host-side helper)."""
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


def copy_blocks(caches: list[tuple[torch.Tensor, torch.Tensor]], pairs: list[tuple[int, int]]) -> None:
    """Copy block `src` to block `dst` for each `(src, dst)` pair, in every layer's (key, value) caches.

    A forked sequence's partially filled last block is copied before either side writes into it
    (copy on write). No dst may also be a src among `pairs`."""
    if not pairs or not caches:
        return
    device = caches[0][0].device
    src = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=device)
    dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=device)
    if use_triton(caches[0][0]):
        copy = importlib.import_module("kernels.triton_ops.cache").copy_blocks
    else:
        copy = cache.copy_blocks
    for key_cache, value_cache in caches:
        copy(key_cache, value_cache, src, dst)
