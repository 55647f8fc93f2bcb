"""allowed_token_ids: every other token's logit becomes -inf."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from engine.processors.base import Admission, LogitsProcessor, RowRef
from engine.processors.indexing import masked_fill_rows


class AllowedTokenIds(LogitsProcessor):
    """One cached [V] mask per distinct allowed set, shared by the sequences that ask for it (the n
    samples of a request, or many requests sending the same list); dropped with its last user."""

    def __init__(self) -> None:
        self._sets: dict[str, frozenset[int]] = {}
        self._users = Counter[frozenset[int]]()
        self._banned: dict[frozenset[int], torch.Tensor] = {}  # True for every token outside the set

    def admit(self, key: str, admission: Admission) -> bool:
        allowed = admission.params.allowed_token_ids
        if allowed is None:
            return False
        self._hold(key, frozenset(allowed))
        return True

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        masks = [self._mask(self._sets[ref.key], logits) for ref in refs]
        masked_fill_rows(logits, rows, torch.stack(masks), float("-inf"))

    def fork(self, parent: str, child: str) -> None:
        self._hold(child, self._sets[parent])

    def release(self, key: str) -> None:
        allowed = self._sets.pop(key)
        self._users[allowed] -= 1
        if self._users[allowed] <= 0:
            del self._users[allowed]
            self._banned.pop(allowed, None)

    def _hold(self, key: str, allowed: frozenset[int]) -> None:
        self._sets[key] = allowed
        self._users[allowed] += 1

    def _mask(self, allowed: frozenset[int], logits: torch.Tensor) -> torch.Tensor:
        mask = self._banned.get(allowed)
        if mask is None or mask.device != logits.device or mask.shape[0] != logits.shape[1]:
            mask = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            mask[sorted(allowed)] = False
            self._banned[allowed] = mask
        return mask
