"""Minimal inputs on which the fuzzers found core bugs, kept as regression tests.

A new finding goes in as the smallest request that shows the bug, marked `xfail(strict=True)`, with
a predicate in `fuzz/known_bugs.py` so the properties skip it meanwhile. Once the owner fixes the
core, strict xfail fails the suite: remove the marker and the predicate, and the test stays here as
a plain regression test.
"""

from __future__ import annotations

import json

from fuzz.harness import make_app
from protocol import StartResponse

JSON = [(b"content-type", b"application/json")]


def _status(body: dict) -> int | None:
    outputs = make_app().handle("POST", "/v1/completions", JSON, json.dumps(body).encode()).start()
    return next((output.status for output in outputs if isinstance(output, StartResponse)), None)


def test_huge_n_is_refused_at_once() -> None:
    """Found by the fuzzer: the core built n samples eagerly, so n=10**9 hung it (now a 400 above 128)."""
    assert _status({"prompt": "hi", "n": 10**9, "max_tokens": 1}) == 400
    assert _status({"prompt": "hi", "n": 129, "max_tokens": 1}) == 400
    assert _status({"prompt": "hi", "n": 2, "best_of": 10**9, "max_tokens": 1}) == 400
