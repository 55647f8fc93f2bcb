"""Batch-invariant mode: a row's result does not depend on what else is in the batch.

The fastest matmul, attention and norm paths pick their reduction order from the batch shape (BLAS
switches kernels with the row count, the batched decode attention pads every sequence to the longest),
so the same prompt can give different logits in different batches. In batch-invariant mode the kernels
switch to paths with a fixed reduction order per row, at some cost in speed; the default stays fastest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_batch_invariant = False


def set_batch_invariant(enabled: bool) -> None:
    """Turn batch-invariant kernels on or off for the whole process."""
    global _batch_invariant
    _batch_invariant = bool(enabled)


def is_batch_invariant() -> bool:
    return _batch_invariant


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Run a block in (or out of) batch-invariant mode, restoring the previous mode afterwards."""
    previous = _batch_invariant
    set_batch_invariant(enabled)
    try:
        yield
    finally:
        set_batch_invariant(previous)
