"""Paged attention for a flat token batch: the per-layer KV tensors and the per-step metadata.

The model sees only `AttentionMetadata` and `attend()`. Each step the engine describes the batch
once (which new tokens belong to which sequence, where their keys and values go, which blocks
each sequence reads), as int32 tensors built with a few vectorised ops; every layer then writes
its new keys/values with `kernels.reshape_and_cache` and attends with `kernels.paged_attention`.
Which block holds which tokens is decided by `engine.kv_cache.KVCacheManager`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import kernels
from engine.model_config import ModelConfig
from protocol.engine_api import MediaInput


class PagedKVCache:
    """Keys and values of every layer, `[num_blocks, block_size, num_kv_heads, head_dim]` each."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.layers = [
            kernels.allocate_kv_cache(
                num_blocks, block_size, config.num_key_value_heads, config.head_dim, dtype, self.device
            )
            for _ in range(config.num_hidden_layers)
        ]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Memory one block takes over all layers (keys and values)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize
        return per_token * block_size


@dataclass(frozen=True)
class SequenceSpan:
    """The new tokens of one sequence this step: ids at positions `start ...`, stored in `block_ids`."""

    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]  # the sequence's block table (at least up to start + len(token_ids))
    media: Sequence[MediaInput] = ()  # the sequence's media items (the runner embeds those in the span)


@dataclass
class AttentionMetadata:
    """What every attention layer of one step needs; built once per step by `build_step`."""

    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor  # [num_tokens] int32: flat cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with -1
    seq_lens: torch.Tensor  # [num_seqs] int32: cached + new tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    max_seq_len: int
    # host-side copies, so the engine can pick rows without reading tensors back
    query_ends: list[int]  # query_start_loc[1:] as a list


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata


def build_step(kv_cache: PagedKVCache, spans: Sequence[SequenceSpan]) -> StepInputs:
    """The model inputs for one step over `spans` (one per scheduled sequence, in batch order)."""
    device, block_size = kv_cache.device, kv_cache.block_size
    query_lens = [len(span.token_ids) for span in spans]
    starts = [span.start for span in spans]
    seq_lens = [start + length for start, length in zip(starts, query_lens, strict=True)]
    ends = list(itertools.accumulate(query_lens))
    num_tokens = ends[-1] if ends else 0
    tables = [
        list(span.block_ids[: -(-seq_len // block_size)])
        for span, seq_len in zip(spans, seq_lens, strict=True)
    ]
    width = max((len(t) for t in tables), default=0)
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)

    # position of every new token = its sequence's start + its offset inside the sequence's span
    seq_of_token = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(query_lens))
    first_token = torch.tensor([end - length for end, length in zip(ends, query_lens, strict=True)])
    positions = torch.arange(num_tokens) - first_token[seq_of_token] + torch.tensor(starts)[seq_of_token]
    blocks = block_tables[seq_of_token, positions // block_size].long()
    slot_mapping = (blocks * block_size + positions % block_size).to(torch.int32)

    input_ids = torch.tensor(list(itertools.chain.from_iterable(span.token_ids for span in spans)))
    meta = AttentionMetadata(
        kv_cache=kv_cache,
        slot_mapping=slot_mapping.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, *ends], dtype=torch.int32, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_ends=ends,
    )
    return StepInputs(input_ids.to(device), positions.to(device), meta)


def attend(
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Store this layer's new keys/values in the paged cache, then attend over each sequence's cache
    (only its last `sliding_window` positions up to each token's own, for a local layer).

    q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] -> [T, heads, head_dim].
    The cache keeps every block of a windowed layer too: freeing blocks that fell out of every
    layer's window is left to the cache manager (not done yet).
    """
    key_cache, value_cache = meta.kv_cache.layers[layer]
    kernels.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
    return kernels.paged_attention(
        q,
        key_cache,
        value_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        scale,
        meta.max_query_len,
        meta.max_seq_len,
        sliding_window,
    )
