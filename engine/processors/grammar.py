"""Structured output's mask: each constrained sequence may only take tokens its guide allows.

State per sequence: a matcher over its compiled guide (`engine.structured`). Each step writes
every constrained row's bitmask into one [rows, words] int32 buffer (microseconds per row: both
libraries precompute their transitions), then expands all rows at once into a boolean mask and
fills the rest with -inf. It runs first in the pipeline, as in vLLM, so bias and penalties only
reshape what the grammar allows.

A verification row with a draft is masked at the guide's state advanced by the draft, then the
matcher rolls back (the draft may be rejected). A draft token the guide refuses makes the later
rows unreachable (rejection stops there), so they reuse the last valid state's mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from engine.processors.base import Admission, LogitsProcessor, RowRef
from engine.processors.indexing import masked_fill_rows
from engine.structured import GuideCompiler, Matcher
from engine.structured.guides import words

logger = logging.getLogger(__name__)

_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarMask(LogitsProcessor):
    def __init__(self, guides: GuideCompiler) -> None:
        self._guides = guides
        self._matchers: dict[str, Matcher] = {}
        self._eos: tuple[int, ...] = ()

    def admit(self, key: str, admission: Admission) -> bool:
        constraint = admission.params.structured
        if constraint is None:
            return False
        # the engine admits a constrained sequence only once its guide is compiled
        self._matchers[key] = self._guides.ready(constraint).matcher()
        if not self._eos:
            self._eos = tuple(sorted(admission.eos_token_ids))
        return True

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        vocab = logits.shape[1]
        bitmask = torch.zeros((len(rows), words(vocab)), dtype=torch.int32)
        for i, ref in enumerate(refs):
            matcher = self._matchers[ref.key]
            taken = 0
            for token_id in ref.draft:
                if not matcher.advance(token_id):
                    break
                taken += 1
            matcher.fill(bitmask[i])
            matcher.rollback(taken)
        allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).view(len(rows), -1)[:, :vocab].bool()
        self._allow_every_eos(allowed)
        masked_fill_rows(logits, rows, ~allowed.to(logits.device), float("-inf"))

    def _allow_every_eos(self, allowed: torch.Tensor) -> None:
        """The guides know one EOS id; a model may end with any of its EOS ids. A row the guide
        allows nothing (a matcher past its end) may still end."""
        if not self._eos:
            return
        eos = list(self._eos)
        ends = allowed[:, eos].any(dim=1) | ~allowed.any(dim=1)
        allowed[:, eos] = ends.unsqueeze(1).expand(-1, len(eos))

    def accept(self, key: str, token_ids: Sequence[int]) -> None:
        matcher = self._matchers[key]
        for token_id in token_ids:
            if token_id in self._eos:
                return
            if not matcher.advance(token_id):
                logger.warning("sequence %s took token %d outside its guide", key, token_id)
                return

    def fork(self, parent: str, child: str) -> None:
        self._matchers[child] = self._matchers[parent].copy()

    def release(self, key: str) -> None:
        self._matchers.pop(key, None)
