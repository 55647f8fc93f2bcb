"""Inputs that hit core bugs already pinned by an xfail test in `fuzz/test_regressions.py`.

The properties skip these (hypothesis `assume`) so the default run stays green and keeps
looking for *new* bugs. When the owner fixes a bug and removes the xfail marker, delete the
matching predicate here so the fuzzers cover that input again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fuzz.strategies import FuzzRequest

SANE_N = 64


def _body(request: FuzzRequest) -> dict[str, Any] | None:
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _huge_n(request: FuzzRequest) -> bool:
    """test_huge_n_is_refused_at_once: the core builds n samples eagerly, so n=10**9 hangs it."""
    body = _body(request)
    if body is None:
        return False
    return any(isinstance(body.get(key), int) and body[key] > SANE_N for key in ("n", "best_of"))


KNOWN_BUGS: dict[str, Callable[[FuzzRequest], bool]] = {
    "test_huge_n_is_refused_at_once": _huge_n,
}


def known_bug(request: FuzzRequest) -> str | None:
    """The regression test pinning the bug this request would hit, if any."""
    for name, hits in KNOWN_BUGS.items():
        if hits(request):
            return name
    return None
