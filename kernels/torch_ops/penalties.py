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


def _seen(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool: which tokens occur in each row of `token_ids` [B, N] (ids outside [0, V) are padding)."""
    ids = token_ids.long()
    ids = ids.masked_fill((ids < 0) | (ids >= vocab_size), vocab_size)
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size]


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
    penalties are [B] (1.0, 0.0, 0.0 leave a row unchanged). Only the (row, token) entries that occur are
    read and written, so the cost follows the token counts rather than B * V float operations.
    """
    vocab = logits.shape[1]
    repetition = repetition_penalties.to(logits.dtype)
    if bool((repetition != 1.0).any()):
        rows, tokens = (_seen(prompt_token_ids, vocab) | _seen(output_token_ids, vocab)).nonzero(as_tuple=True)
        values, factor = logits[rows, tokens], repetition[rows]
        logits[rows, tokens] = torch.where(values > 0, values / factor, values * factor)
    frequency, presence = frequency_penalties.to(logits.dtype), presence_penalties.to(logits.dtype)
    if bool(((frequency != 0) | (presence != 0)).any()):
        counts = token_counts(output_token_ids, vocab)
        rows, tokens = counts.nonzero(as_tuple=True)
        penalty = frequency[rows] * counts[rows, tokens] + presence[rows]
        logits[rows, tokens] -= penalty
    return logits
