"""min_tokens: until that many tokens are out, no token may end the sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.processors.base import Admission, LogitsProcessor, RowRef
from engine.processors.indexing import fill_entries


@dataclass
class _Hold:
    remaining: int  # tokens still to come before a stop is allowed
    stops: tuple[int, ...]  # stop token ids, and EOS unless ignore_eos


class MinTokens(LogitsProcessor):
    """State: how many tokens remain to be produced. The stop ids (and EOS unless `ignore_eos`) are
    masked while any remain; once none do the sequence leaves the processor (`accept` says False)."""

    def __init__(self) -> None:
        self._holds: dict[str, _Hold] = {}

    def admit(self, key: str, admission: Admission) -> bool:
        params = admission.params
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(admission.eos_token_ids)
        if params.min_tokens <= 0 or not stops:
            return False
        self._holds[key] = _Hold(params.min_tokens, tuple(sorted(stops)))
        return True

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        row_index: list[int] = []
        tokens: list[int] = []
        for row, ref in zip(rows, refs, strict=True):
            hold = self._holds[ref.key]
            if len(ref.draft) < hold.remaining:
                row_index.extend([row] * len(hold.stops))
                tokens.extend(hold.stops)
        fill_entries(logits, row_index, tokens, float("-inf"))

    def accept(self, key: str, token_ids: Sequence[int]) -> bool:
        hold = self._holds[key]
        hold.remaining -= len(token_ids)
        return hold.remaining > 0

    def fork(self, parent: str, child: str) -> None:
        hold = self._holds[parent]
        self._holds[child] = _Hold(hold.remaining, hold.stops)

    def release(self, key: str) -> None:
        del self._holds[key]
