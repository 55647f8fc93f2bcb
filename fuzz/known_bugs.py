"""Inputs that hit core bugs already pinned by an xfail test in `fuzz/test_regressions.py`.

The properties skip these (hypothesis `assume`) so the default run stays green and keeps
looking for *new* bugs. When the owner fixes a bug and removes the xfail marker, delete the
matching predicate here so the fuzzers cover that input again.
"""

from __future__ import annotations

from collections.abc import Callable

from fuzz.strategies import FuzzRequest

# Regression test name -> predicate over requests. Empty: every bug found so far is fixed
# (test_huge_n_is_refused_at_once was the first entry; the core now caps n at 128).
KNOWN_BUGS: dict[str, Callable[[FuzzRequest], bool]] = {}


def known_bug(request: FuzzRequest) -> str | None:
    """The regression test pinning the bug this request would hit, if any."""
    for name, hits in KNOWN_BUGS.items():
        if hits(request):
            return name
    return None
