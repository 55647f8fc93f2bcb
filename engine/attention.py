"""Attention over a flat token batch, reading and writing keys/values through per-sequence caches.

v0 keeps one contiguous cache per sequence and runs attention sequence by sequence with torch's
SDPA; projections and MLPs still run on the whole flat batch. The model only sees
`AttentionMetadata` and `attend()`, so a paged cache with batched varlen attention can replace
this module without touching the model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MIN_CAPACITY = 64


class SequenceKVCache:
    """Keys and values of one sequence for every layer: [layers, 2, capacity, kv_heads, head_dim].

    Grows by doubling (up to `max_len`), so a request asking for many tokens does not reserve
    them all up front.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int = _MIN_CAPACITY,
    ):
        self.max_len = max_len
        self.length = 0  # tokens whose keys/values are stored
        capacity = max(1, min(max(capacity, _MIN_CAPACITY), max_len))
        self.kv = torch.empty(num_layers, 2, capacity, num_kv_heads, head_dim, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens."""
        if total > self.max_len:
            raise ValueError(f"sequence of {total} tokens exceeds the cache limit of {self.max_len}")
        if total <= self.capacity:
            return
        capacity = min(max(total, 2 * self.capacity), self.max_len)
        grown = self.kv.new_empty(self.kv.shape[0], 2, capacity, *self.kv.shape[3:])
        grown[:, :, : self.length] = self.kv[:, :, : self.length]
        self.kv = grown

    def fork(self) -> SequenceKVCache:
        """An independent copy (for the n samples of one prompt, prefilled once)."""
        twin = object.__new__(SequenceKVCache)
        twin.max_len = self.max_len
        twin.length = self.length
        twin.kv = self.kv.clone()
        return twin


@dataclass
class AttentionMetadata:
    """How the flat batch splits into sequences: for each, its query tokens and its cache.

    Sequence i owns `query_lens[i]` consecutive tokens of the batch, at positions
    `start_positions[i]` onward; its cache already holds the tokens before `start_positions[i]`.
    """

    query_lens: list[int]
    start_positions: list[int]
    caches: list[SequenceKVCache]

    def __post_init__(self) -> None:
        for cache, start, qlen in zip(self.caches, self.start_positions, self.query_lens, strict=True):
            cache.reserve(start + qlen)

    def commit(self) -> None:
        """Record the tokens this forward pass wrote (call once the model has run)."""
        for cache, start, qlen in zip(self.caches, self.start_positions, self.query_lens, strict=True):
            cache.length = start + qlen


def attend(
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], caching k/v on the way."""
    out = torch.empty_like(q)
    offset = 0
    for cache, start, qlen in zip(meta.caches, meta.start_positions, meta.query_lens, strict=True):
        end = start + qlen
        rows = slice(offset, offset + qlen)
        cache.kv[layer, 0, start:end] = k[rows]
        cache.kv[layer, 1, start:end] = v[rows]
        keys = cache.kv[layer, 0, :end].transpose(0, 1)[None]
        values = cache.kv[layer, 1, :end].transpose(0, 1)[None]
        queries = q[rows].transpose(0, 1)[None]
        mask = None
        if qlen > 1 and start > 0:  # a chunk after cached tokens: causal, shifted by `start`
            query_pos = torch.arange(start, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] <= query_pos
        result = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            is_causal=qlen > 1 and start == 0,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = result[0].transpose(0, 1)
        offset += qlen
    return out
