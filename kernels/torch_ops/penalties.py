"""Repetition, frequency and presence penalties (vLLM semantics).

Repetition divides positive logits (multiplies negative ones) by the penalty for every token seen in the
prompt or the output; frequency subtracts `penalty * count` and presence subtracts `penalty` for tokens
seen in the output only.

One implementation, `apply_token_penalties`, works on each row's *seen tokens*: the distinct ids of its
prompt and output with their output counts. That is the state a logits processor keeps incrementally
(`engine.processors.penalties`), and it costs a row its number of distinct tokens, never its vocabulary.
`apply_penalties` takes whole token histories and reduces them to that form first.
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


def seen_tokens(
    prompt_token_ids: torch.Tensor, output_token_ids: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's distinct prompt and output ids [B, K] (padded with -1) and their output counts [B, K] int32."""
    counts = token_counts(output_token_ids, vocab_size)
    seen = (counts > 0) | (token_counts(prompt_token_ids, vocab_size) > 0)
    rows, tokens = seen.nonzero(as_tuple=True)  # row-major: each row's tokens are contiguous
    per_row = seen.sum(dim=1)
    width = int(per_row.max()) if rows.numel() else 0
    columns = torch.arange(rows.numel(), device=rows.device) - (per_row.cumsum(0) - per_row)[rows]
    ids = torch.full((seen.shape[0], width), -1, dtype=torch.int64, device=rows.device)
    seen_counts = torch.zeros(seen.shape[0], width, dtype=torch.int32, device=rows.device)
    ids[rows, columns] = tokens
    seen_counts[rows, columns] = counts[rows, tokens]
    return ids, seen_counts


def apply_token_penalties(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Penalise logits [B, V] in place at each row's seen tokens and return them.

    token_ids [B, K]: the distinct ids a row has seen in its prompt or output, padded with any id outside
    [0, V); output_counts [B, K]: how often each occurs in the output (0 for a prompt-only token).
    Penalties are [B] (1.0, 0.0, 0.0 leave a row unchanged). Only those (row, token) entries are read and
    written.
    """
    vocab = logits.shape[1]
    ids = token_ids.long()
    rows, columns = ((ids >= 0) & (ids < vocab)).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return logits
    tokens = ids[rows, columns]
    counts = output_counts[rows, columns].to(logits.dtype)
    values = logits[rows, tokens]
    repetition = repetition_penalties.to(logits.dtype)[rows]
    values = torch.where(values > 0, values / repetition, values * repetition)
    values = values - frequency_penalties.to(logits.dtype)[rows] * counts
    values = values - presence_penalties.to(logits.dtype)[rows] * (counts > 0).to(logits.dtype)
    logits[rows, tokens] = values
    return logits


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor,
    output_token_ids: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Penalise logits [B, V] in place from whole histories and return them.

    prompt_token_ids [B, P] and output_token_ids [B, O] are padded with any id outside [0, V) (-1 or V);
    penalties are [B]. Reduces the histories to seen tokens (`seen_tokens`) and applies
    `apply_token_penalties`.
    """
    ids, counts = seen_tokens(prompt_token_ids, output_token_ids, logits.shape[1])
    return apply_token_penalties(
        logits, ids, counts, repetition_penalties, frequency_penalties, presence_penalties
    )
