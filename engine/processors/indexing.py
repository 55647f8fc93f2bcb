"""Batched writes into a subset of logits rows, shared by the built-in processors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def covers_all(logits: torch.Tensor, rows: Sequence[int]) -> bool:
    """Whether `rows` is every row of `logits` in order (then a processor can work on `logits` itself)."""
    return len(rows) == logits.shape[0] and all(i == row for i, row in enumerate(rows))


def fill_entries(logits: torch.Tensor, rows: Sequence[int], tokens: Sequence[int], value: float) -> None:
    """`logits[rows[i], tokens[i]] = value` for every i, in one indexed write."""
    if rows:
        device = logits.device
        logits[torch.tensor(rows, device=device), torch.tensor(tokens, device=device)] = value


def masked_fill_rows(logits: torch.Tensor, rows: Sequence[int], mask: torch.Tensor, value: float) -> None:
    """`logits[rows[i]]` filled with `value` where `mask[i]` [len(rows), V] is True."""
    if covers_all(logits, rows):
        logits.masked_fill_(mask, value)
        return
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill_(mask, value)
