"""Paged attention over the KV cache: prefill, chunked prefill on cached context, and decode, with GQA.

Query token j of a sequence with `q_len` new tokens and total length `L` sits at position `L - q_len + j`
and sees every cached position up to its own. The new tokens' keys and values are already in the cache.
With a `sliding_window` W (Gemma 3's local layers, Mistral) it sees only the last W positions up to its
own: key position k is visible from query position p when `p - W < k <= p`, as transformers masks it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (query [S, H, D], key_cache, value_cache, block_tables [S, n], seq_lens [S], scale, max_seq_len,
#  sliding_window or None) -> [S, H, D]
DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int, int | None],
    torch.Tensor,
]


def window_start(seq_len: int, q_len: int, sliding_window: int | None) -> int:
    """The first key position any of a sequence's `q_len` new tokens sees (0 without a window)."""
    if sliding_window is None:
        return 0
    return max(seq_len - q_len - sliding_window + 1, 0)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Rows of `cache` for `blocks` [..., n] laid out as [..., n*block_size, num_kv_heads, head_dim]."""
    gathered = cache.index_select(0, blocks.reshape(-1).long())
    return gathered.view(*blocks.shape[:-1], -1, cache.shape[2], cache.shape[3])


def _attend_one_sequence(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of one sequence's new tokens `query` [q_len, H, D] over its first `seq_len` cached tokens.

    With a window only the blocks from the first visible position on are read."""
    q_len = query.shape[0]
    block_size = key_cache.shape[1]
    first_block = window_start(seq_len, q_len, sliding_window) // block_size
    num_blocks = -(-seq_len // block_size)
    offset = first_block * block_size  # position of the first gathered key
    keys = _gather_blocks(key_cache, block_table[first_block:num_blocks])[: seq_len - offset]
    values = _gather_blocks(value_cache, block_table[first_block:num_blocks])[: seq_len - offset]
    context_len = seq_len - q_len
    mask = None
    windowed = sliding_window is not None and seq_len - offset > sliding_window
    if (context_len > 0 and q_len > 1) or windowed:
        # Bottom-right aligned causal mask: new token j sees positions <= context_len + j (and, with a
        # window, > context_len + j - sliding_window).
        positions = torch.arange(offset, seq_len, device=query.device)
        query_positions = positions[context_len - offset :, None]
        mask = positions <= query_positions
        if windowed:
            mask &= positions > query_positions - sliding_window
    # 4-d [1, heads, len, head_dim]: with 3-d inputs torch's CPU SDPA takes its unfused math path
    # (measured 2-3x slower for 100-400 token chunks in bfloat16)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None and context_len == 0 and q_len > 1,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _attend_decodes(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One new token per sequence, query [S, H, D]: every sequence's blocks gathered in one batched op and
    padded to the longest, padding (and positions before the window) masked out. Cache rows past a
    sequence's length must hold finite values (`kernels.allocate_kv_cache` zero-fills), since padded
    values meet zero weights in the matmul.
    """
    num_blocks = -(-max_seq_len // key_cache.shape[1])
    # Shorter sequences' tables may be padded with -1 there; any real block does, its rows are masked.
    blocks = block_tables[:, :num_blocks].clamp(min=0)
    keys = _gather_blocks(key_cache, blocks)
    values = _gather_blocks(value_cache, blocks)
    positions = torch.arange(keys.shape[1], device=query.device)
    lengths = seq_lens[:, None].to(query.device)
    visible = positions < lengths
    if sliding_window is not None:
        visible &= positions >= lengths - sliding_window
    if query.dtype != torch.float32:
        return _attend_decodes_by_matmul(query, keys, values, visible, scale)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


def _attend_decodes_by_matmul(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """Decode attention as two batched matmuls with the softmax in float32.

    Used for 16-bit dtypes: torch's CPU SDPA with a mask and GQA takes a slow path there (about 7x
    slower than this for 32 sequences of 256 tokens in bfloat16); in float32 SDPA is the faster one.
    """
    seqs, num_heads, head_dim = query.shape
    kv_heads = keys.shape[2]
    grouped = query.view(seqs, kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.permute(0, 2, 3, 1)).float().mul_(scale)  # [S, Hkv, G, L]
    scores.masked_fill_(~visible[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(weights, values.permute(0, 2, 1, 3)).reshape(seqs, num_heads, head_dim)


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
    decode: DecodeAttention | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention for a ragged batch of sequences; returns [num_tokens, num_heads, head_dim].

    query: [num_tokens, num_heads, head_dim]; key_cache/value_cache: [num_blocks, block_size, num_kv_heads,
    head_dim]; block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 (context including the
    new tokens); query_start_loc: [num_seqs + 1] int32 (the new tokens of sequence i are
    query[query_start_loc[i]:query_start_loc[i+1]]).
    Decode-only batches run as one batched op; sequences with several new tokens run one SDPA each, and
    single-token sequences in a mixed batch are still batched together, by `decode` (default: the torch
    one here; `kernels.cpu_ops` passes its C++ kernel). `sliding_window` (None: none) limits what each
    token sees to its last that many positions.
    """
    decode = decode or _attend_decodes
    if max_query_len == 1 and query.shape[0] == seq_lens.shape[0]:
        return decode(
            query, key_cache, value_cache, block_tables, seq_lens, scale, max_seq_len, sliding_window
        )
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    rows = _DecodeRows()
    for seq, seq_len in enumerate(lengths):
        start, end = starts[seq], starts[seq + 1]
        if end - start <= DECODE_ROWS_UP_TO:
            rows.add(seq, start, end, seq_len)
        else:
            out[start:end] = _attend_one_sequence(
                query[start:end], key_cache, value_cache, block_tables[seq], seq_len, scale, sliding_window
            )
    rows.attend(decode, out, query, key_cache, value_cache, block_tables, scale, sliding_window)
    return out


# A sequence with at most this many new tokens (a verified draft, a short chunk) has them computed
# as decode rows, token i seeing the context up to itself: one batched kernel call for all of them
# instead of one SDPA per sequence (which on the CPU costs about as much as the kernel call for a
# whole batch), and a verified draft's rows computed exactly as plain decoding computes them.
DECODE_ROWS_UP_TO = 16


class _DecodeRows:
    """The tokens of a ragged batch that run as decode rows: where each is, its sequence, its context."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.seqs: list[int] = []
        self.lens: list[int] = []

    def add(self, seq: int, start: int, end: int, seq_len: int) -> None:
        """Tokens start..end of sequence `seq`, whose context is `seq_len` with all of them."""
        self.tokens.extend(range(start, end))
        self.seqs.extend([seq] * (end - start))
        self.lens.extend(range(seq_len - (end - start) + 1, seq_len + 1))

    def attend(
        self,
        decode: DecodeAttention,
        out: torch.Tensor,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
        sliding_window: int | None,
    ) -> None:
        """Fill `out` at these tokens with one `decode` call."""
        if not self.tokens:
            return
        token_index = torch.tensor(self.tokens, device=query.device)
        lens = torch.tensor(self.lens, dtype=torch.int32, device=query.device)
        out[token_index] = decode(
            query[token_index],
            key_cache,
            value_cache,
            block_tables[torch.tensor(self.seqs, device=block_tables.device)],
            lens,
            scale,
            max(self.lens),
            sliding_window,
        )


def paged_attention_batch_invariant(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    decode: DecodeAttention | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`paged_attention` computed one token at a time over exactly its own context: no padding to the
    batch's longest sequence and no dependence on how a prompt was split into chunks (a prefix-cache
    hit or a busy step's token budget changes the split), so a token's result depends on nothing but
    its sequence.

    `decode`, if given, must itself compute each row alone (the C++ CPU kernel does); it then takes
    every token of the batch in one call."""
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    if decode:
        rows = _DecodeRows()
        for seq, seq_len in enumerate(lengths):
            rows.add(seq, starts[seq], starts[seq + 1], seq_len)
        rows.attend(decode, out, query, key_cache, value_cache, block_tables, scale, sliding_window)
        return out
    for seq, seq_len in enumerate(lengths):
        start, end = starts[seq], starts[seq + 1]
        for token in range(start, end):
            # A private copy of the query row: the same memory alignment whatever the row's batch offset.
            out[token : token + 1] = _attend_one_sequence(
                query[token : token + 1].clone(),
                key_cache,
                value_cache,
                block_tables[seq],
                seq_len - (end - 1 - token),
                scale,
                sliding_window,
            )
    return out
