"""Repetition, frequency and presence penalties (vLLM semantics).

Repetition divides positive logits (multiplies negative ones) by the penalty for every token seen in the
prompt or the output; frequency subtracts `penalty * count` and presence subtracts `penalty` for tokens
seen in the output only.
"""

from __future__ import annotations

import torch


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] int32 occurrence counts of `token_ids` [B, N]; ids outside [0, V) are padding and not counted."""
    ids = token_ids.long()
    padding = (ids < 0) | (ids >= vocab_size)
    ids = ids.masked_fill(padding, vocab_size)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties_from_counts(
    logits: torch.Tensor,
    prompt_counts: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Penalise logits [B, V] in place given [B, V] token counts; returns logits."""
    output_seen = output_counts > 0
    seen = (prompt_counts > 0) | output_seen
    repetition = repetition_penalties.to(logits.dtype).unsqueeze(1)
    factor = torch.where(seen, repetition, 1.0)
    logits.copy_(torch.where(logits > 0, logits / factor, logits * factor))
    logits.sub_(frequency_penalties.to(logits.dtype).unsqueeze(1) * output_counts)
    logits.sub_(presence_penalties.to(logits.dtype).unsqueeze(1) * output_seen)
    return logits


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor,
    output_token_ids: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Penalise logits [B, V] in place and return them.

    prompt_token_ids [B, P] and output_token_ids [B, O] are padded with any id outside [0, V) (-1 or V);
    penalties are [B] (1.0, 0.0, 0.0 leave a row unchanged).
    """
    vocab = logits.shape[1]
    return apply_penalties_from_counts(
        logits,
        token_counts(prompt_token_ids, vocab),
        token_counts(output_token_ids, vocab),
        repetition_penalties,
        frequency_penalties,
        presence_penalties,
    )
