"""Random ragged batches over a paged KV cache, with the dense per-sequence K/V a naive reference reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    dense_keys: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim]
    dense_values: list[torch.Tensor]
    q_lens: list[int]
    scale: float

    @property
    def max_query_len(self) -> int:
        return max(self.q_lens)

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    def attention_args(self, key_cache: torch.Tensor | None = None, value_cache: torch.Tensor | None = None):
        """The positional arguments of `paged_attention` (a sliding window goes by keyword)."""
        return (
            self.query,
            self.key_cache if key_cache is None else key_cache,
            self.value_cache if value_cache is None else value_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.scale,
            self.max_query_len,
            self.max_seq_len,
        )


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    unused_fill: float | None = None,
) -> PagedBatch:
    """Sequences whose blocks are scattered over a shuffled cache; cache rows no sequence owns (and the
    tail of each sequence's last block) hold random stale values, or `unused_fill` (e.g. NaN) if given."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-seq_len // block_size) for seq_len in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    # Entries past a sequence's blocks are -1: kernels must never follow them.
    block_tables = torch.full((len(seq_lens), max(blocks_needed) + 1), -1, dtype=torch.int32)
    dense_keys, dense_values = [], []
    for seq, (needed, seq_len) in enumerate(zip(blocks_needed, seq_lens, strict=True)):
        blocks = [order.pop() for _ in range(needed)]
        block_tables[seq, :needed] = torch.tensor(blocks, dtype=torch.int32)
        positions = torch.arange(seq_len)
        block_ids = torch.tensor(blocks)[positions // block_size]
        offsets = positions % block_size
        owned[block_ids, offsets] = True
        dense_keys.append(key_cache[block_ids, offsets].clone())
        dense_values.append(value_cache[block_ids, offsets].clone())
    if unused_fill is not None:
        key_cache[~owned] = unused_fill
        value_cache[~owned] = unused_fill
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=generator).to(dtype)
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    return PagedBatch(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        dense_keys=dense_keys,
        dense_values=dense_values,
        q_lens=list(q_lens),
        scale=head_dim**-0.5,
    )


def naive_attention(batch: PagedBatch, sliding_window: int | None = None) -> torch.Tensor:
    """Dense causal attention in float64 straight from the definition, one sequence at a time; with a
    sliding window W, query position p sees key positions k with p - W < k <= p."""
    num_heads = batch.query.shape[1]
    out = torch.empty(batch.query.shape, dtype=torch.float64)
    starts = batch.query_start_loc.tolist()
    for seq, q_len in enumerate(batch.q_lens):
        keys = batch.dense_keys[seq].double()
        values = batch.dense_values[seq].double()
        seq_len = keys.shape[0]
        group = num_heads // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        query = batch.query[starts[seq] : starts[seq] + q_len].double().transpose(0, 1)  # [H, q, D]
        scores = query @ keys.transpose(1, 2) * batch.scale
        query_positions = torch.arange(seq_len - q_len, seq_len)[:, None]
        key_positions = torch.arange(seq_len)[None, :]
        hidden = key_positions > query_positions
        if sliding_window is not None:
            hidden |= key_positions <= query_positions - sliding_window
        scores = scores.masked_fill(hidden, float("-inf"))
        out[starts[seq] : starts[seq] + q_len] = (scores.softmax(-1) @ values).transpose(0, 1)
    return out
