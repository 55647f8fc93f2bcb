"""logit_bias: a fixed value added to chosen tokens' logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.processors.base import Admission, LogitsProcessor, RowRef


class LogitBias(LogitsProcessor):
    """Each sequence's bias kept as device tensors (token ids, values), added for the whole batch by one
    accumulating indexed write."""

    def __init__(self) -> None:
        self._bias: dict[str, dict[int, float]] = {}
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def admit(self, key: str, admission: Admission) -> bool:
        bias = admission.params.logit_bias
        if not bias:
            return False
        self._bias[key] = {int(token): float(value) for token, value in bias.items()}
        return True

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        pairs = [self._pair(ref.key, logits) for ref in refs]
        ids = torch.cat([ids for ids, _ in pairs])
        values = torch.cat([values for _, values in pairs])
        lengths = torch.tensor([ids.shape[0] for ids, _ in pairs], device=logits.device)
        row_index = torch.repeat_interleave(torch.tensor(rows, device=logits.device), lengths)
        logits.index_put_((row_index, ids), values, accumulate=True)

    def fork(self, parent: str, child: str) -> None:
        self._bias[child] = self._bias[parent]

    def release(self, key: str) -> None:
        del self._bias[key]
        self._tensors.pop(key, None)

    def _pair(self, key: str, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._tensors.get(key)
        if pair is None or pair[1].device != logits.device or pair[1].dtype != logits.dtype:
            bias = self._bias[key]
            pair = (
                torch.tensor(list(bias), dtype=torch.int64, device=logits.device),
                torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device),
            )
            self._tensors[key] = pair
        return pair
