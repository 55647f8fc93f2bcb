"""Repetition, frequency and presence penalties applied in one elementwise pass over the logits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.torch_ops.penalties import token_counts


@triton.jit
def penalties_kernel(
    logits_ptr,
    prompt_counts_ptr,
    output_counts_ptr,
    repetition_ptr,
    frequency_ptr,
    presence_ptr,
    vocab,
    logits_row_stride,
    prompt_row_stride,
    output_row_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    logits = tl.load(logits_ptr + row * logits_row_stride + cols, mask=mask, other=0.0)
    prompt_count = tl.load(prompt_counts_ptr + row * prompt_row_stride + cols, mask=mask, other=0)
    output_count = tl.load(output_counts_ptr + row * output_row_stride + cols, mask=mask, other=0)
    repetition = tl.load(repetition_ptr + row).to(logits.dtype)
    frequency = tl.load(frequency_ptr + row).to(logits.dtype)
    presence = tl.load(presence_ptr + row).to(logits.dtype)
    factor = tl.where((prompt_count > 0) | (output_count > 0), repetition, 1.0)
    logits = tl.where(logits > 0, logits / factor, logits * factor)
    logits = logits - frequency * output_count.to(logits.dtype)
    logits = logits - presence * (output_count > 0).to(logits.dtype)
    tl.store(logits_ptr + row * logits_row_stride + cols, logits, mask=mask)


def apply_penalties_from_counts(
    logits: torch.Tensor,
    prompt_counts: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Penalise logits [B, V] in place given [B, V] prompt and output token counts; returns logits."""
    batch, vocab = logits.shape
    if batch == 0:
        return logits
    if logits.stride(1) != 1 or prompt_counts.stride(1) != 1 or output_counts.stride(1) != 1:
        raise ValueError("logits and counts must be contiguous along the vocabulary")
    block = min(triton.next_power_of_2(vocab), 1024)
    penalties_kernel[(batch, triton.cdiv(vocab, block))](
        logits,
        prompt_counts,
        output_counts,
        repetition_penalties,
        frequency_penalties,
        presence_penalties,
        vocab,
        logits.stride(0),
        prompt_counts.stride(0),
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
    """Same contract as `kernels.torch_ops.penalties.apply_penalties` (counts built with torch's scatter_add)."""
    vocab = logits.shape[1]
    return apply_penalties_from_counts(
        logits,
        token_counts(prompt_token_ids, vocab),
        token_counts(output_token_ids, vocab),
        repetition_penalties,
        frequency_penalties,
        presence_penalties,
    )
