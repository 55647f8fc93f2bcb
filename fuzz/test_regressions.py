"""Minimal inputs on which the fuzzers found core bugs, kept as regression tests.

A new finding goes in as the smallest request that shows the bug, marked `xfail(strict=True)`, with
a predicate in `fuzz/known_bugs.py` so the properties skip it meanwhile. Once the owner fixes the
core, strict xfail fails the suite: remove the marker and the predicate, and the test stays here as
a plain regression test.
"""

from __future__ import annotations

import json

from jsonschema import Draft202012Validator

from fuzz.harness import make_app
from protocol import App, AppConfig, Body, StartResponse

JSON = [(b"content-type", b"application/json")]


def _status(body: dict) -> int | None:
    outputs = make_app().handle("POST", "/v1/completions", JSON, json.dumps(body).encode()).start()
    return next((output.status for output in outputs if isinstance(output, StartResponse)), None)


def test_huge_n_is_refused_at_once() -> None:
    """Found by the fuzzer: the core built n samples eagerly, so n=10**9 hung it (now a 400 above 128)."""
    assert _status({"prompt": "hi", "n": 10**9, "max_tokens": 1}) == 400
    assert _status({"prompt": "hi", "n": 129, "max_tokens": 1}) == 400
    assert _status({"prompt": "hi", "n": 2, "best_of": 10**9, "max_tokens": 1}) == 400


def test_documented_401_matches_what_the_server_sends() -> None:
    """Found by test_openapi_stack: /openapi.json described a 401 as an OpenAI error object, but the
    server answers vLLM's flat `{"error": "Unauthorized"}`; and GET /v1/models and /load, which need
    the key too, listed no 401 at all."""
    app = make_app(AppConfig(api_keys=["k"]))
    document = json.loads(_body(app, "GET", "/openapi.json"))
    sent = _body(app, "GET", "/v1/models")
    assert json.loads(sent) == {"error": "Unauthorized"}
    for path, method in (("/v1/chat/completions", "post"), ("/v1/models", "get"), ("/load", "get")):
        response = document["paths"][path][method]["responses"]["401"]
        schema = {**response["content"]["application/json"]["schema"], "components": document["components"]}
        assert not list(Draft202012Validator(schema).iter_errors(json.loads(sent))), path


def _body(app: App, method: str, path: str) -> bytes:
    call = app.handle(method, path, [], b"")
    return b"".join(output.data for output in call.start() if isinstance(output, Body))
