"""Repetition, frequency and presence penalties, through the batched kernel `kernels.apply_token_penalties`.

State per sequence: its *seen tokens* (the distinct ids of its output, and of its prompt when a
repetition penalty asks for them) with their output counts. They live in two device tensors with
one row (a slot) per sequence, `ids` and `counts` [slots, width], written incrementally: a step's
accepted tokens become one indexed write before the next `apply`, never a rebuild of the history.
`apply` hands the kernel the rows of this batch's sequences, so its cost is each row's number of
distinct tokens, not the vocabulary. A Python copy of the same state (token -> column, count) lets
a fork start a new slot from the parent's tokens and a draft find its tokens' columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import kernels
from engine.processors.base import Admission, LogitsProcessor, RowRef
from engine.processors.indexing import covers_all


@dataclass
class _Seen:
    slot: int
    penalties: tuple[float, float, float]  # repetition, frequency, presence
    columns: dict[int, int] = field(default_factory=dict)  # token -> its column in the slot's row
    counts: dict[int, int] = field(default_factory=dict)  # token -> occurrences in the output
    pending: list[tuple[int, int, int]] = field(default_factory=list)  # (column, token, count to add)
    fresh: bool = True  # the slot's row may still hold a previous sequence's tokens

    def add(self, token: int, count: int) -> None:
        column = self.columns.setdefault(token, len(self.columns))
        if count:
            self.counts[token] = self.counts.get(token, 0) + count
        self.pending.append((column, token, count))


class Penalties(LogitsProcessor):
    def __init__(self) -> None:
        self._seqs: dict[str, _Seen] = {}
        self._dirty: set[str] = set()  # sequences with writes not yet in the tensors
        self._free_slots: list[int] = []
        self._num_slots = 0
        self._ids: torch.Tensor | None = None  # [slots, width] int32, -1 past a row's tokens
        self._counts: torch.Tensor | None = None  # [slots, width] int32

    # ---- lifecycle ----

    def admit(self, key: str, admission: Admission) -> bool:
        p = admission.params
        if p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty:
            return False
        seen = self._new(key, (p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
        if p.repetition_penalty != 1.0:  # the prompt matters to repetition only
            for token in dict.fromkeys(admission.prompt_token_ids):
                seen.add(token, 0)
        return True

    def accept(self, key: str, token_ids: Sequence[int]) -> None:
        seen = self._seqs[key]
        for token in token_ids:
            seen.add(token, 1)
        self._dirty.add(key)

    def fork(self, parent: str, child: str) -> None:
        source = self._seqs[parent]
        seen = self._new(child, source.penalties)
        for token in source.columns:  # same columns, in the same order
            seen.add(token, source.counts.get(token, 0))

    def release(self, key: str) -> None:
        seen = self._seqs.pop(key)
        self._dirty.discard(key)
        self._free_slots.append(seen.slot)

    def _new(self, key: str, penalties: tuple[float, float, float]) -> _Seen:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot, self._num_slots = self._num_slots, self._num_slots + 1
        seen = self._seqs[key] = _Seen(slot, penalties)
        self._dirty.add(key)
        return seen

    # ---- the step ----

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        self._flush(logits.device)
        assert self._ids is not None and self._counts is not None
        seqs = [self._seqs[ref.key] for ref in refs]
        drafts = [self._draft_columns(seen, ref.draft) for seen, ref in zip(seqs, refs, strict=True)]
        width = max(len(seen.columns) + len(new) for seen, (_, new) in zip(seqs, drafts, strict=True))
        if width == 0:
            return
        self._reserve(self._num_slots, width, logits.device)
        device = logits.device
        slots = torch.tensor([seen.slot for seen in seqs], device=device)
        ids = self._ids[:, :width].index_select(0, slots)
        counts = self._counts[:, :width].index_select(0, slots)
        penalties = [seen.penalties for seen in seqs]
        if any(draft for draft, _ in drafts):
            self._add_drafts(ids, counts, drafts)
        if not covers_all(logits, rows):  # the other rows: no tokens, neutral penalties
            index = torch.tensor(rows, device=device)
            ids = torch.full((logits.shape[0], width), -1, dtype=ids.dtype, device=device).index_copy_(
                0, index, ids
            )
            counts = torch.zeros_like(ids).index_copy_(0, index, counts)
            neutral = [(1.0, 0.0, 0.0)] * logits.shape[0]
            for row, penalty in zip(rows, penalties, strict=True):
                neutral[row] = penalty
            penalties = neutral
        repetition, frequency, presence = torch.tensor(
            penalties, dtype=logits.dtype, device=device
        ).T.contiguous()
        kernels.apply_token_penalties(logits, ids, counts, repetition, frequency, presence)

    @staticmethod
    def _draft_columns(seen: _Seen, draft: Sequence[int]) -> tuple[list[tuple[int, int]], dict[int, int]]:
        """(column, token) per draft token, and the columns of tokens the draft sees first (past the
        sequence's own); the sequence's state is left as it is."""
        if not draft:
            return [], {}
        new: dict[int, int] = {}
        placed = []
        for token in draft:
            column = seen.columns.get(token)
            if column is None:
                column = new.setdefault(token, len(seen.columns) + len(new))
            placed.append((column, token))
        return placed, new

    @staticmethod
    def _add_drafts(
        ids: torch.Tensor, counts: torch.Tensor, drafts: list[tuple[list[tuple[int, int]], dict[int, int]]]
    ) -> None:
        rows = [row for row, (placed, _) in enumerate(drafts) for _ in placed]
        columns = [column for placed, _ in drafts for column, _ in placed]
        tokens = [token for placed, _ in drafts for _, token in placed]
        index = (torch.tensor(rows, device=ids.device), torch.tensor(columns, device=ids.device))
        ids.index_put_(index, torch.tensor(tokens, dtype=ids.dtype, device=ids.device))
        counts.index_put_(
            index, torch.ones(len(rows), dtype=counts.dtype, device=counts.device), accumulate=True
        )

    def _flush(self, device: torch.device) -> None:
        """Write the accepted tokens (and new sequences' prompts) into the slot tensors, in one go."""
        if not self._dirty:
            if self._ids is None:
                self._reserve(self._num_slots, 1, device)
            return
        seqs = [self._seqs[key] for key in self._dirty]
        self._reserve(self._num_slots, max(len(seen.columns) for seen in seqs), device)
        assert self._ids is not None and self._counts is not None
        fresh = [seen.slot for seen in seqs if seen.fresh]
        if fresh:
            index = torch.tensor(fresh, device=device)
            self._ids.index_fill_(0, index, -1)
            self._counts.index_fill_(0, index, 0)
        slots = [seen.slot for seen in seqs for _ in seen.pending]
        columns = [column for seen in seqs for column, _, _ in seen.pending]
        if slots:
            index = (torch.tensor(slots, device=device), torch.tensor(columns, device=device))
            tokens = [token for seen in seqs for _, token, _ in seen.pending]
            added = [count for seen in seqs for _, _, count in seen.pending]
            self._ids.index_put_(index, torch.tensor(tokens, dtype=torch.int32, device=device))
            self._counts.index_put_(
                index, torch.tensor(added, dtype=torch.int32, device=device), accumulate=True
            )
        for seen in seqs:
            seen.pending.clear()
            seen.fresh = False
        self._dirty.clear()

    def _reserve(self, slots: int, width: int, device: torch.device) -> None:
        """Grow the slot tensors (doubling) to hold `slots` rows of `width` columns on `device`."""
        ids, counts = self._ids, self._counts
        if ids is not None and counts is not None and ids.device == device:
            if ids.shape[0] >= slots and ids.shape[1] >= width:
                return
            rows = ids.shape[0] if ids.shape[0] >= slots else max(slots, 2 * ids.shape[0])
            columns = ids.shape[1] if ids.shape[1] >= width else max(width, 2 * ids.shape[1])
        else:
            rows, columns = max(slots, 8), max(width, 64)
        self._ids = torch.full((rows, columns), -1, dtype=torch.int32, device=device)
        self._counts = torch.zeros((rows, columns), dtype=torch.int32, device=device)
        if ids is not None and counts is not None:
            self._ids[: ids.shape[0], : ids.shape[1]] = ids.to(device)
            self._counts[: counts.shape[0], : counts.shape[1]] = counts.to(device)
