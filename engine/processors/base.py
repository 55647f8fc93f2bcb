"""Logits processors: batched, stateful, told about every token a sequence accepts.

The seam between the model's logits and the draw. A processor sees the whole batch as one tensor
and reshapes only the rows of the sequences it admitted; rows that do not use it cost it nothing
(the pipeline never calls it for them). It keeps its own per-sequence state, keyed by the
sequence's id, and the engine tells it, in this order of a sequence's life:

- `admit`: a new sequence (its sampling params and prompt); the processor answers whether it has
  anything to do for it, and keeps state only if so;
- `apply`: the rows of this step's logits that belong to its sequences. During speculative
  verification a sequence has several rows, one per position; each row's `RowRef.draft` is the
  proposed tokens between the accepted output and that position, so a stateful processor applies
  its state advanced by the draft (without keeping it: the draft may be rejected);
- `accept`: the tokens a sequence accepted this step (one, or several after verification); a
  processor that will never again change the sequence's logits (min_tokens reached) answers False
  and is released from it, so later steps cost it nothing;
- `fork`: a sequence was copied (a beam extended in two ways): the child starts from the parent's
  state;
- `preempt`: the sequence lost its KV blocks and will be recomputed; its output tokens are kept, so
  token-derived state stays valid (a processor caching device tensors may drop them);
- `release`: the sequence finished or was aborted; its state goes.

Grammar masks of structured output plug in here as one more processor whose state is the
grammar's position.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch

from protocol.engine_api import SamplingParams


@dataclass(frozen=True)
class RowRef:
    """Which sequence a logits row belongs to, and the draft tokens before that row's position."""

    key: str
    draft: tuple[int, ...] = ()


@dataclass(frozen=True)
class Admission:
    """What a processor may read about a new sequence."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    eos_token_ids: Collection[int] = ()


class LogitsProcessor:
    """Base class: a processor that applies to no sequence. Subclasses override what they need."""

    def admit(self, key: str, admission: Admission) -> bool:
        """Start state for sequence `key`; False when this processor has nothing to do for it."""
        return False

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        """Reshape `logits[rows[i]]` for `refs[i]` in place; only admitted sequences are passed."""

    def accept(self, key: str, token_ids: Sequence[int]) -> bool | None:
        """Sequence `key` accepted `token_ids` (appended to its output, in order). False: done with it
        for good (the pipeline releases it); None or True: keep it."""
        return None

    def fork(self, parent: str, child: str) -> None:
        """Sequence `child` continues from `parent`'s state (admitted only if the parent was)."""

    def preempt(self, key: str) -> None:
        """Sequence `key` will be recomputed; its output tokens are kept."""

    def release(self, key: str) -> None:
        """Sequence `key` is finished or aborted."""


class LogitsPipeline:
    """Processors in order, each called only with the rows of the sequences it admitted."""

    def __init__(self, processors: Iterable[LogitsProcessor]) -> None:
        self.processors = list(processors)
        self._users: list[set[str]] = [set() for _ in self.processors]

    def admit(self, key: str, admission: Admission) -> None:
        for processor, users in zip(self.processors, self._users, strict=True):
            if processor.admit(key, admission):
                users.add(key)

    def uses_any(self, key: str) -> bool:
        """Whether some processor keeps state for `key`."""
        return any(key in users for users in self._users)

    def apply(self, logits: torch.Tensor, refs: Sequence[RowRef]) -> None:
        """Run every processor over the rows of its sequences, in pipeline order."""
        for processor, users in zip(self.processors, self._users, strict=True):
            if not users:
                continue
            rows = [i for i, ref in enumerate(refs) if ref.key in users]
            if rows:
                processor.apply(logits, rows, [refs[i] for i in rows])

    def accept(self, key: str, token_ids: Sequence[int]) -> None:
        for processor, users in zip(self.processors, self._users, strict=True):
            if key in users and processor.accept(key, token_ids) is False:
                processor.release(key)
                users.discard(key)

    def fork(self, parent: str, child: str) -> None:
        for processor, users in zip(self.processors, self._users, strict=True):
            if parent in users:
                processor.fork(parent, child)
                users.add(child)

    def preempt(self, key: str) -> None:
        for processor, users in zip(self.processors, self._users, strict=True):
            if key in users:
                processor.preempt(key)

    def release(self, key: str) -> None:
        for processor, users in zip(self.processors, self._users, strict=True):
            if key in users:
                processor.release(key)
                users.discard(key)
