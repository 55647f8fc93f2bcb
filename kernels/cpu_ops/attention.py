"""Paged attention on the CPU with the C++ decode kernel: decode rows read the cache in place, prefill
chunks keep the torch path (gathered blocks into torch's SDPA, which is GEMM-based and fast there)."""

from __future__ import annotations

from typing import Any

import torch

from kernels.torch_ops import attention as torch_attention


def decode_rows(ops: Any) -> torch_attention.DecodeAttention:
    """The C++ decode kernel of `ops` (the built kernels) in the torch path's decode signature.

    Each (sequence, kv head) is computed alone in a fixed order, so a row's result does not depend on
    the other rows: batch-invariant mode uses it too."""

    def decode(
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        max_seq_len: int,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        return ops.paged_decode_attention(
            query.contiguous(),
            key_cache,
            value_cache,
            block_tables.to(torch.int32).contiguous(),
            seq_lens.to(torch.int32).contiguous(),
            scale,
            -1 if sliding_window is None else sliding_window,
        )

    return decode


def paged_attention(ops: Any, *args: Any, sliding_window: int | None = None) -> torch.Tensor:
    """`kernels.torch_ops.attention.paged_attention(*args)` with its decode rows done by `ops`."""
    return torch_attention.paged_attention(*args, decode=decode_rows(ops), sliding_window=sliding_window)
