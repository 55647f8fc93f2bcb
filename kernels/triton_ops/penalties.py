"""Repetition, frequency and presence penalties at each row's seen tokens, one program per (row, block).

Same contract as `kernels.torch_ops.penalties`: the kernel reads and writes only the logits of the
tokens a row has seen (distinct per row, so no two lanes write one entry).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.torch_ops.penalties import seen_tokens


@triton.jit
def token_penalties_kernel(
    logits_ptr,
    token_ids_ptr,
    counts_ptr,
    repetition_ptr,
    frequency_ptr,
    presence_ptr,
    vocab,
    width,
    logits_row_stride,
    token_ids_row_stride,
    counts_row_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = columns < width
    tokens = tl.load(token_ids_ptr + row * token_ids_row_stride + columns, mask=in_row, other=-1).to(tl.int64)
    valid = in_row & (tokens >= 0) & (tokens < vocab)
    count = tl.load(counts_ptr + row * counts_row_stride + columns, mask=valid, other=0)
    pointers = logits_ptr + row * logits_row_stride + tokens
    logits = tl.load(pointers, mask=valid, other=0.0)
    repetition = tl.load(repetition_ptr + row).to(logits.dtype)
    frequency = tl.load(frequency_ptr + row).to(logits.dtype)
    presence = tl.load(presence_ptr + row).to(logits.dtype)
    logits = tl.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - frequency * count.to(logits.dtype)
    logits = logits - presence * (count > 0).to(logits.dtype)
    tl.store(pointers, logits, mask=valid)


def apply_token_penalties(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `kernels.torch_ops.penalties.apply_token_penalties`."""
    batch, vocab = logits.shape
    width = token_ids.shape[1]
    if batch == 0 or width == 0:
        return logits
    if logits.stride(1) != 1 or token_ids.stride(1) != 1 or output_counts.stride(1) != 1:
        raise ValueError("logits, token ids and counts must be contiguous along their last dimension")
    block = min(triton.next_power_of_2(width), 1024)
    token_penalties_kernel[(batch, triton.cdiv(width, block))](
        logits,
        token_ids,
        output_counts,
        repetition_penalties,
        frequency_penalties,
        presence_penalties,
        vocab,
        width,
        logits.stride(0),
        token_ids.stride(0),
        output_counts.stride(0),
        BLOCK=block,
    )
    return logits


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor,
    output_token_ids: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `kernels.torch_ops.penalties.apply_penalties` (histories reduced by torch)."""
    ids, counts = seen_tokens(prompt_token_ids, output_token_ids, logits.shape[1])
    return apply_token_penalties(
        logits, ids, counts, repetition_penalties, frequency_penalties, presence_penalties
    )
