"""Varlen paged attention: prefill, chunked prefill over cached context, and decode in one kernel, with GQA.

One program per (tile of BLOCK_Q new tokens of one sequence, kv head). The tile's rows are the BLOCK_Q
tokens times the query heads sharing that kv head (padded to a power of two), so decode still fills the
matmul's rows with the GQA group. Keys and values are read one cache block at a time through the block
table with an online softmax; a row's reduction order depends only on its own sequence. With a sliding
window the loop starts at the first block any row of the tile can see.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_ops._dot import dot_precision, dot_upcast


@triton.jit
def paged_attention_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    queries_per_kv,
    head_dim,
    query_token_stride,
    query_head_stride,
    out_token_stride,
    out_head_stride,
    key_block_stride,
    key_slot_stride,
    key_head_stride,
    value_block_stride,
    value_slot_stride,
    value_head_stride,
    block_table_stride,
    tiles_per_seq,
    sliding_window,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_BLOCK
    seq = tl.program_id(0) // tiles_per_seq
    tile = tl.program_id(0) % tiles_per_seq
    kv_head = tl.program_id(1)

    query_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    query_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int64) - query_start
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    token = tile * BLOCK_Q + rows // GROUP_BLOCK  # index among the sequence's new tokens
    head_in_group = rows % GROUP_BLOCK
    head = kv_head * queries_per_kv + head_in_group
    row_valid = (token < query_len) & (head_in_group < queries_per_kv)
    dims = tl.arange(0, HEAD_BLOCK)
    dim_valid = dims < head_dim

    q = tl.load(
        query_ptr
        + (query_start + token)[:, None] * query_token_stride
        + head[:, None] * query_head_stride
        + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if DOT_UPCAST:
        q = q.to(tl.float32)
    query_position = context_len + token

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_BLOCK], dtype=tl.float32)

    # Keys up to the last position any token of this tile may see; empty tiles loop zero times.
    last_token = tl.minimum((tile + 1) * BLOCK_Q, query_len)
    kv_end = tl.maximum(context_len + last_token, 0)
    first_block = 0
    if WINDOWED:  # the tile's first token sees from `context_len + tile * BLOCK_Q - sliding_window + 1` on
        first_block = tl.maximum(context_len + tile * BLOCK_Q - sliding_window + 1, 0) // BLOCK_SIZE
    slots = tl.arange(0, BLOCK_SIZE)
    for block_index in range(first_block, (kv_end + BLOCK_SIZE - 1) // BLOCK_SIZE):
        block_id = tl.load(block_tables_ptr + seq * block_table_stride + block_index).to(tl.int64)
        kv_position = block_index * BLOCK_SIZE + slots
        kv_valid = kv_position < seq_len
        kv_mask = kv_valid[:, None] & dim_valid[None, :]
        k = tl.load(
            key_cache_ptr
            + block_id * key_block_stride
            + slots[:, None] * key_slot_stride
            + kv_head * key_head_stride
            + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if DOT_UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = (kv_position[None, :] <= query_position[:, None]) & kv_valid[None, :]
        if WINDOWED:
            visible = visible & (kv_position[None, :] > query_position[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # Rows that have seen nothing yet keep a finite reference point instead of -inf - -inf = NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        correction = tl.exp2(running_max - safe_max)
        probs = tl.exp2(scores - safe_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        v = tl.load(
            value_cache_ptr
            + block_id * value_block_stride
            + slots[:, None] * value_slot_stride
            + kv_head * value_head_stride
            + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if DOT_UPCAST:
            v = v.to(tl.float32)
        probs = probs.to(value_cache_ptr.dtype.element_ty).to(v.dtype)
        acc = acc * correction[:, None] + tl.dot(probs, v, input_precision=DOT_PRECISION)
        running_max = new_max

    acc = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
    tl.store(
        out_ptr + (query_start + token)[:, None] * out_token_stride + head[:, None] * out_head_stride + dims[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


# Rows (new tokens x query heads per kv head) per program. Decode-only batches use a small tile; batch-
# invariant mode always uses the prefill tile so a token's tile shape never depends on the batch.
DECODE_TILE_ROWS = 16
PREFILL_TILE_ROWS = 64


def tile_tokens(max_query_len: int, queries_per_kv: int, batch_invariant: bool) -> tuple[int, int]:
    """(BLOCK_Q new tokens per tile, GROUP_BLOCK query heads per kv head padded to a power of two)."""
    group_block = triton.next_power_of_2(queries_per_kv)
    rows = PREFILL_TILE_ROWS if (max_query_len > 1 or batch_invariant) else DECODE_TILE_ROWS
    return max(rows // group_block, 1), group_block


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    batch_invariant: bool = False,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Same contract as `kernels.torch_ops.attention.paged_attention`."""
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError("query heads must be a multiple of kv heads, with the cache's head_dim")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the triton kernel needs a power-of-two block_size >= 16, got {block_size}")
    if query.dtype != key_cache.dtype or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query and caches must share a dtype and have a contiguous head_dim")
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    queries_per_kv = num_heads // num_kv_heads
    block_q, group_block = tile_tokens(max_query_len, queries_per_kv, batch_invariant)
    tiles_per_seq = triton.cdiv(max_query_len, block_q)
    paged_attention_kernel[(num_seqs * tiles_per_seq, num_kv_heads)](
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * math.log2(math.e),
        queries_per_kv,
        head_dim,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        tiles_per_seq,
        0 if sliding_window is None else sliding_window,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        GROUP_BLOCK=group_block,
        HEAD_BLOCK=max(triton.next_power_of_2(head_dim), 16),
        DOT_PRECISION=dot_precision(query.dtype),
        DOT_UPCAST=dot_upcast(query.dtype),
        WINDOWED=sliding_window is not None,
    )
    return out
