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
from protocol.media.fetch import MediaFetchFailed
from protocol.outputs import Compute, Fetch, compute_inline
from protocol.testing import tiny_vision_model

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


def _chat(app: App, body: dict, headers: tuple = ()) -> tuple[list, object]:
    call = app.handle("POST", "/v1/chat/completions", [*JSON, *headers], json.dumps(body).encode())
    return _decoded(call, call.start()), call


def _decoded(call, outputs: list) -> list:
    """The outputs after the call's media decoding (which a server runs on a worker thread)."""
    while len(outputs) == 1 and isinstance(outputs[0], Compute):
        outputs = call.feed([compute_inline(outputs[0])])
    return outputs


def _user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_a_media_error_keeps_the_request_id_and_cors_headers() -> None:
    """Found by the media fuzzing: a 400 for a bad image (decoded inline, or after the runtime
    fetched it) went out without X-Request-Id (--enable-request-id-headers) or CORS headers, which
    every other answer carries: MediaCall built its error without the call's headers."""
    config = AppConfig(enable_request_id_headers=True, allowed_origins=["*"])
    app = make_app(config, tiny_vision_model())
    headers = ((b"x-request-id", b"abc"), (b"origin", b"http://client.example"))
    wanted = {(b"x-request-id", b"abc"), (b"access-control-allow-origin", b"*")}
    inline = _user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
    outputs, _ = _chat(app, {"messages": inline}, headers)
    start = next(output for output in outputs if isinstance(output, StartResponse))
    assert start.status == 400 and wanted <= set(start.headers)
    fetched = _user({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}})
    (fetch,), call = _chat(app, {"messages": fetched}, headers)
    assert isinstance(fetch, Fetch)
    outputs = _decoded(call, call.feed([MediaFetchFailed(fetch.requests[0].key, "HTTP 404")]))
    start = next(output for output in outputs if isinstance(output, StartResponse))
    assert start.status == 400 and wanted <= set(start.headers)


def test_a_null_image_embeds_part_is_a_400() -> None:
    """Found by the media fuzzing: with --enable-mm-embeds, an `image_embeds` part whose value is
    null or missing was taken for a URL part and failed an assertion while decoding: a 500."""
    app = make_app(AppConfig(enable_mm_embeds=True), tiny_vision_model(embeds_hidden_size=8))
    for part in (
        {"type": "image_embeds", "image_embeds": None},
        {"type": "image_embeds"},
        {"image_embeds": None},
    ):
        outputs, _ = _chat(app, {"messages": _user(part)})
        start = next(output for output in outputs if isinstance(output, StartResponse))
        error = json.loads(b"".join(output.data for output in outputs if isinstance(output, Body)))["error"]
        assert start.status == 400, error
        assert error["param"] == "messages" and "messages[0].content[0]" in error["message"]
