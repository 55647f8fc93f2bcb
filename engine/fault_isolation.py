"""Which request made a batched forward pass fail: each request's part of the batch is run alone.

Why this is safe: a forward pass writes K/V only into the slots of the tokens it computes, and
writes the same values when run again, and the scheduler advances only after a forward pass
succeeds; so a failed step's requests can be re-run one at a time, and the ones that still fail
alone are the culprits. Faults are rare, so the cost (one forward per request) is paid only then.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

Work = TypeVar("Work")


def requests_failing_alone(
    forward: Callable[[Sequence[Work]], object], spans_by_request: Mapping[str, Sequence[Work]]
) -> set[str]:
    """The requests whose work (their spans of the step) makes `forward` raise when run without the others."""
    failing = set()
    for request_id, spans in spans_by_request.items():
        try:
            forward(spans)
        except Exception:  # noqa: BLE001 - any failure marks the request; the caller logs the first
            failing.add(request_id)
    return failing
