"""The application's routing, auth, content types, ids and the engine-free endpoints."""

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import App, AppConfig, Body, EndResponse, Generate, ServedModel, StartResponse, Submit, Tokens
from protocol.app import _ROUTES, OPEN_PATHS
from protocol.state import SERVING, Health, ServerStatus
from protocol.testing import BOS_ID, ByteTokenizer, tiny_pooling_model, tiny_served_model

NOW = 1_700_000_000.0
JSON = (b"content-type", b"application/json")


def make_app(models=None, **config):
    ids = itertools.count(1)
    return App(
        AppConfig(**config),
        models or [tiny_served_model()],
        clock=lambda: NOW,
        new_id=lambda: f"id{next(ids)}",
    )


UNHEALTHY = ServerStatus(Health.UNHEALTHY)
DRAINING = ServerStatus(Health.DRAINING)


def respond(app, method, path, body=b"", headers=(JSON,), status=SERVING):
    """An immediate call's response as (status, headers, body); engine calls give their Submit."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    call = app.handle(method, path, list(headers), body, status=status)
    outputs = call.start()
    if isinstance(outputs[0], Submit):
        return outputs[0]
    start, *bodies, end = outputs
    assert isinstance(start, StartResponse) and isinstance(end, EndResponse) and call.finished
    assert all(isinstance(b, Body) for b in bodies)
    return start.status, dict(start.headers), b"".join(b.data for b in bodies)


def error_of(response):
    status, headers, body = response
    assert headers[b"content-type"] == b"application/json"
    error = json.loads(body)["error"]
    assert error["code"] == status and set(error) == {"message", "type", "param", "code"}
    return status, error


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


# ---- routing ----


def test_unknown_path_is_404_and_wrong_method_is_405():
    app = make_app()
    assert error_of(respond(app, "GET", "/nope"))[0] == 404
    status, headers, _ = respond(app, "GET", "/v1/chat/completions")
    assert status == 405 and headers[b"allow"] == b"POST"
    assert error_of(respond(app, "DELETE", "/v1/models"))[0] == 405


POOLING_ROUTES = {
    "/v1/embeddings": {"input": "a"},
    "/pooling": {"input": "a"},
    "/classify": {"input": "a"},
    "/score": {"text_1": "a", "text_2": "b"},
    "/v1/score": {"text_1": "a", "text_2": "b"},
    "/rerank": {"query": "a", "documents": ["b"]},
    "/v1/rerank": {"query": "a", "documents": ["b"]},
    "/v2/rerank": {"query": "a", "documents": ["b"]},
}


@pytest.mark.parametrize("path", sorted(POOLING_ROUTES))
def test_pooling_routes_are_json_posts_for_pooling_models(path):
    model = tiny_pooling_model(("embed", "classify"), name="pooler")
    app = make_app([model])
    submit = respond(app, "POST", path, POOLING_ROUTES[path])
    prefix = {"/v1/embeddings": "embd-", "/pooling": "pool-", "/classify": "classify-"}.get(path)
    prefix = prefix or ("score-" if path.endswith("score") else "rerank-")
    assert isinstance(submit, Submit) and all(c.request_id.startswith(prefix) for c in submit.commands)
    assert app.handle("POST", path, [JSON], json.dumps(POOLING_ROUTES[path]).encode()).model == "pooler"
    status, headers, _ = respond(app, "GET", path)
    assert status == 405 and headers[b"allow"] == b"POST"
    status, error = error_of(
        respond(app, "POST", path, POOLING_ROUTES[path], headers=[(b"content-type", b"text/plain")])
    )
    assert status == 400 and error["message"] == "Unsupported Media Type: Only 'application/json' is allowed"


def test_without_a_model_each_api_goes_to_the_first_model_that_serves_it():
    generator = tiny_served_model(name="gen")
    embedder = tiny_pooling_model(("embed",), name="emb")
    cross = tiny_pooling_model(("classify", "score"), name="cross")
    for models in ([generator, embedder, cross], [cross, embedder, generator]):
        app = make_app(models)
        assert app.handle("POST", "/v1/embeddings", [JSON], b'{"input": "a"}').model == "emb"
        assert app.handle("POST", "/v1/chat/completions", [JSON], json.dumps(CHAT).encode()).model == "gen"
        assert app.handle("POST", "/v1/completions", [JSON], b'{"prompt": "a"}').model == "gen"
        assert app.handle("POST", "/classify", [JSON], b'{"input": "a"}').model == "cross"
        expected = "cross" if models[0] is cross else "emb"
        assert app.handle("POST", "/rerank", [JSON], b'{"query": "a", "documents": ["b"]}').model == expected
    # a named model is that model, whatever it serves
    status, error = error_of(
        respond(make_app([generator, embedder]), "POST", "/v1/embeddings", {"model": "gen", "input": "a"})
    )
    assert status == 400 and error["message"] == "The model does not support Embeddings API"


def test_engine_routes_submit_work_for_their_model():
    app = make_app()
    chat = app.handle("POST", "/v1/chat/completions", [JSON], json.dumps(CHAT).encode())
    assert chat.model == "tiny-byte-model"
    assert isinstance(chat.start()[0].commands[0], Generate)
    completion = app.handle("POST", "/v1/completions", [JSON], b'{"prompt": "x"}')
    assert completion.start()[0].commands[0].request_id == "cmpl-id2-0"


def test_query_strings_and_root_path():
    app = make_app(root_path="/api")
    assert respond(app, "GET", "/api/v1/models?x=1")[0] == 200
    assert respond(app, "GET", "/v1/models")[0] == 200
    assert respond(app, "GET", "/api/health")[0] == 200


def test_whole_responses_carry_their_content_length():
    """Known-length bodies are not sent chunked: errors, model lists, finished completions."""
    app = make_app()
    for answer in [respond(app, "GET", "/v1/models"), respond(app, "GET", "/nope"), respond(app, "GET", "/version")]:
        status, headers, body = answer
        assert headers[b"content-length"] == str(len(body)).encode(), (status, headers)
    call = app.handle("POST", "/v1/chat/completions", [JSON], json.dumps(CHAT).encode())
    (submit,) = call.start()
    (generate,) = submit.commands
    start, body, _ = call.feed([Tokens(generate.request_id, 0, (1,), 3, finish_reason="length")])
    assert dict(start.headers)[b"content-length"] == str(len(body.data)).encode()


def test_health_ping_version():
    app = make_app(version="9.9")
    assert respond(app, "GET", "/health") == (200, {b"content-length": b"0"}, b"")
    assert respond(app, "GET", "/health", status=UNHEALTHY)[0] == 503
    assert respond(app, "POST", "/ping", headers=())[0] == 200
    assert respond(app, "GET", "/ping", status=UNHEALTHY)[0] == 503
    status, _, body = respond(app, "GET", "/version")
    assert (status, json.loads(body)) == (200, {"version": "9.9"})


def test_a_draining_server_refuses_new_work_but_still_answers_probes():
    app = make_app(api_keys=["k"])
    assert respond(app, "GET", "/health", status=DRAINING)[0] == 503
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    auth = (JSON, (b"authorization", b"Bearer k"))
    status, headers, body = respond(app, "POST", "/v1/chat/completions", chat, headers=auth, status=DRAINING)
    assert (status, headers[b"retry-after"]) == (503, b"1")
    assert json.loads(body)["error"]["message"].startswith("The server is shutting down")
    for path in ("/tokenize", "/v1/embeddings", "/no/such/path"):
        assert respond(app, "POST", path, {}, headers=auth, status=DRAINING)[0] == 503
    for path in ("/metrics", "/version", "/v1/models", "/openapi.json"):
        assert respond(app, "GET", path, headers=auth, status=DRAINING)[0] in (200, 404), path
    assert respond(app, "GET", "/version", status=DRAINING)[0] == 200


def test_load_reports_requests_in_flight_only_with_load_tracking():
    busy = ServerStatus(load=7)
    assert json.loads(respond(make_app(), "GET", "/load", status=busy)[2]) == {"server_load": 0}
    tracked = make_app(enable_server_load_tracking=True)
    assert json.loads(respond(tracked, "GET", "/load", status=busy)[2]) == {"server_load": 7}


def test_models_list_shape():
    model = ServedModel(
        names=["main", "alias"], root="/models/main", tokenizer=ByteTokenizer(), max_model_len=64
    )
    status, _, body = respond(make_app([model]), "GET", "/v1/models")
    listing = json.loads(body)
    assert status == 200 and listing["object"] == "list"
    (card,) = listing["data"]
    assert {
        k: card[k] for k in ("id", "object", "owned_by", "root", "parent", "max_model_len", "created")
    } == {
        "id": "main",
        "object": "model",
        "owned_by": "sansllm",
        "root": "/models/main",
        "parent": None,
        "max_model_len": 64,
        "created": int(NOW),
    }
    assert card["permission"][0]["object"] == "model_permission"


def test_any_served_name_is_accepted():
    model = ServedModel(names=["main", "alias"], root="r", tokenizer=ByteTokenizer(), max_model_len=64)
    submit = respond(make_app([model]), "POST", "/v1/completions", {"model": "alias", "prompt": "x"})
    assert isinstance(submit, Submit)


def test_non_generative_model_refuses_chat():
    model = tiny_served_model()
    model.tasks = frozenset({"embed"})
    status, error = error_of(respond(make_app([model]), "POST", "/v1/chat/completions", CHAT))
    assert status == 400 and error["message"] == "The model does not support Chat Completions API"


# ---- content type and bodies ----


@pytest.mark.parametrize("content_type", [None, b"text/plain", b"application/x-www-form-urlencoded"])
def test_json_posts_need_a_json_content_type(content_type):
    headers = [] if content_type is None else [(b"content-type", content_type)]
    status, error = error_of(respond(make_app(), "POST", "/v1/chat/completions", CHAT, headers=headers))
    assert status == 400 and error["message"] == "Unsupported Media Type: Only 'application/json' is allowed"


def test_json_content_type_with_parameters_is_fine():
    headers = [(b"Content-Type", b"Application/JSON; charset=utf-8")]
    assert isinstance(respond(make_app(), "POST", "/v1/chat/completions", CHAT, headers=headers), Submit)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"\xff\xfe", b'{"messages": 3}'])
def test_bad_bodies_are_400(body):
    assert error_of(respond(make_app(), "POST", "/v1/chat/completions", body))[0] == 400


def test_body_over_the_limit_is_413():
    status, _ = error_of(
        respond(make_app(max_request_body_bytes=10), "POST", "/v1/completions", {"prompt": "x" * 20})
    )
    assert status == 413


def test_unknown_model_is_404():
    status, error = error_of(respond(make_app(), "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4"}))
    assert (status, error["type"], error["message"]) == (
        404,
        "NotFoundError",
        "The model `gpt-4` does not exist.",
    )


# ---- auth ----


def test_api_key_guards_every_path_that_serves_a_model():
    app = make_app(api_keys=["k1", "k2"])
    status, headers, body = respond(app, "GET", "/v1/models", headers=())
    assert (status, json.loads(body)) == (401, {"error": "Unauthorized"})
    assert respond(app, "GET", "/v1/models", headers=[(b"authorization", b"Bearer k2")])[0] == 200
    assert respond(app, "GET", "/v1/models", headers=[(b"Authorization", b"bearer k1")])[0] == 200
    assert respond(app, "GET", "/v1/models", headers=[(b"authorization", b"Bearer k3")])[0] == 401
    assert respond(app, "GET", "/v1/models", headers=[(b"authorization", b"Basic k1")])[0] == 401
    assert respond(app, "GET", "/v1/nope", headers=())[0] == 401  # auth comes before routing


def test_api_key_leaves_liveness_version_and_preflight_open():
    app = make_app(api_keys=["k"])
    for method, path in [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping"), ("GET", "/version")]:
        assert respond(app, method, path, headers=())[0] == 200, path
    status, headers, _ = respond(app, "OPTIONS", "/v1/chat/completions", headers=())
    assert status == 200 and b"POST" in headers[b"allow"]


@pytest.mark.parametrize(
    ("method", "path"),
    sorted((method, path) for path, methods in _ROUTES.items() if path not in OPEN_PATHS for method in methods),
)
def test_api_key_guards_every_route_outside_the_open_ones(method, path):
    """vLLM leaves /tokenize, /pooling, /score, /rerank, /classify open; nothing here reaches a model
    (no Submit, no tokenizer) without a key."""
    app = make_app([tiny_served_model(), tiny_pooling_model()], api_keys=["k"])
    for headers in [(JSON,), (JSON, (b"authorization", b"Bearer wrong")), (JSON, (b"authorization", b"k"))]:
        answer = respond(app, method, path, {"model": "x"}, headers=headers)
        assert not isinstance(answer, Submit) and answer[0] == 401, (path, headers)
        assert json.loads(answer[2]) == {"error": "Unauthorized"}
    authorized = respond(app, method, path, {"model": "x"}, headers=(JSON, (b"authorization", b"Bearer k")))
    assert isinstance(authorized, Submit) or authorized[0] != 401


def test_api_key_is_checked_after_stripping_the_root_path():
    app = make_app(api_keys=["k"], root_path="/api")
    assert respond(app, "GET", "/api/v1/models", headers=())[0] == 401


# ---- request ids ----


def test_request_id_header_is_echoed_when_enabled():
    app = make_app(enable_request_id_headers=True)
    status, headers, _ = respond(app, "GET", "/health", headers=[(b"x-request-id", b"abc")])
    assert headers[b"x-request-id"] == b"abc"
    assert respond(app, "GET", "/health")[1][b"x-request-id"] == b"id1"
    assert error_of(respond(app, "GET", "/missing"))  # errors carry it too
    assert respond(app, "GET", "/missing")[1][b"x-request-id"] == b"id3"
    assert b"x-request-id" not in respond(make_app(), "GET", "/health", headers=[(b"x-request-id", b"a")])[1]


def test_request_id_header_on_streamed_responses():
    app = make_app(enable_request_id_headers=True)
    call = app.handle(
        "POST", "/v1/completions", [JSON, (b"x-request-id", b"trace-1")], b'{"prompt":"a","stream":true}'
    )
    (submit,) = call.start()
    engine_id = submit.commands[0].request_id
    assert engine_id.startswith("cmpl-trace-1-")
    start, body = call.feed([Tokens(engine_id, 0, (97,), num_prompt_tokens=2)])[:2]
    assert dict(start.headers)[b"x-request-id"] == b"trace-1"
    assert json.loads(body.data.split(b"data: ")[1])["id"] == "cmpl-trace-1"


def test_reused_client_request_ids_never_collide_in_the_engine():
    app = make_app()
    ids = set()
    for _ in range(2):
        for headers, body in (
            ([JSON, (b"x-request-id", b"same")], b'{"prompt":"a"}'),
            ([JSON], b'{"prompt":"a","request_id":"same"}'),
        ):
            ids.add(app.handle("POST", "/v1/completions", headers, body).start()[0].commands[0].request_id)
    assert len(ids) == 4


def test_body_request_id_names_the_response_and_header():
    app = make_app(enable_request_id_headers=True)
    call = app.handle("POST", "/v1/completions", [JSON], b'{"prompt":"a","request_id":"mine"}')
    engine_id = call.start()[0].commands[0].request_id
    start, body = call.feed([Tokens(engine_id, 0, (97,), num_prompt_tokens=2, finish_reason="length")])[:2]
    assert dict(start.headers)[b"x-request-id"] == b"mine"
    assert json.loads(body.data)["id"] == "cmpl-mine"


# ---- tokenize / detokenize ----


def test_tokenize_prompt():
    status, _, body = respond(make_app(), "POST", "/tokenize", {"prompt": "hé", "return_token_strs": True})
    assert status == 200
    assert json.loads(body) == {
        "count": 4,
        "max_model_len": 256,
        "tokens": [BOS_ID, 104, 0xC3, 0xA9],
        "token_strs": ["<s>", "h", "<0xC3>", "<0xA9>"],
    }
    _, _, body = respond(make_app(), "POST", "/tokenize", {"prompt": "a", "add_special_tokens": False})
    assert json.loads(body)["tokens"] == [97] and json.loads(body)["token_strs"] is None


def test_tokenize_chat_renders_the_template():
    _, _, body = respond(make_app(), "POST", "/tokenize", {"messages": CHAT["messages"]})
    tokens = json.loads(body)["tokens"]
    assert ByteTokenizer().decode(tokens, skip_special_tokens=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    status, error = error_of(
        respond(make_app(), "POST", "/tokenize", {"messages": CHAT["messages"], "chat_template": "x"})
    )
    assert status == 400 and "trust-request-chat-template" in error["message"]


def test_detokenize():
    status, _, body = respond(make_app(), "POST", "/detokenize", {"tokens": [BOS_ID, 104, 0xC3, 0xA9]})
    assert (status, json.loads(body)) == (200, {"prompt": "<s>hé"})
    status, error = error_of(respond(make_app(), "POST", "/detokenize", {"tokens": [99999]}))
    assert status == 400 and "out of vocabulary" in error["message"]
    assert error_of(respond(make_app(), "POST", "/detokenize", {"tokens": "abc"}))[0] == 400


# ---- robustness ----


def test_a_bug_inside_the_core_is_a_500_not_an_exception():
    class Exploding(ByteTokenizer):
        def encode(self, text, add_special_tokens=True):
            raise MemoryError("boom")

    model = tiny_served_model()
    model.tokenizer = Exploding()
    app = make_app([model])
    # A tokenizer failing on client text is the request's problem, reported as a 400...
    assert error_of(respond(app, "POST", "/tokenize", {"prompt": "a"}))[0] == 400
    # ...and an unexpected failure elsewhere is a 500 that still answers.
    model.tokenizer = None
    assert error_of(respond(app, "POST", "/detokenize", {"tokens": [1]}))[0] == 500


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "OPTIONS", "get"]),
    path=st.sampled_from(
        ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/models", "/x"]
    ),
    body=st.one_of(
        st.binary(max_size=40),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "messages",
                            "prompt",
                            "n",
                            "stream",
                            "tokens",
                            "role",
                            "content",
                            "max_tokens",
                            "stop",
                        ]
                    ),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
    ),
)
def test_no_request_produces_a_500(method, path, body):
    app = make_app()
    call = app.handle(method, path, [JSON], body)
    outputs = call.start()
    if isinstance(outputs[0], StartResponse):
        assert outputs[0].status < 500


# ---- GET /v1/models/{id} ----


def test_one_model_card_by_any_of_its_names():
    model = tiny_served_model()
    model.names = ("org/tiny", "tiny")
    app = make_app([model])
    listed = json.loads(respond(app, "GET", "/v1/models")[2])["data"][0]
    for path in ["/v1/models/org/tiny", "/v1/models/tiny", "/v1/models/org%2Ftiny"]:
        status, _, body = respond(app, "GET", path)
        assert status == 200 and json.loads(body) == listed, path
    status, error = error_of(respond(app, "GET", "/v1/models/nope"))
    assert status == 404 and error["message"] == "The model `nope` does not exist."
    assert error_of(respond(app, "GET", "/v1/models/"))[0] == 404
    status, headers, _ = respond(app, "POST", "/v1/models/tiny")
    assert status == 405 and headers[b"allow"] == b"GET"
    assert respond(make_app([model], api_keys=["k"]), "GET", "/v1/models/tiny", headers=())[0] == 401


# ---- /metrics ----


class _State:
    def metrics(self) -> bytes:
        return b"vllm:num_requests_running 0.0\n"


def test_metrics_come_from_the_injected_server_state_and_need_no_key():
    app = App(AppConfig(api_keys=["k"]), [tiny_served_model()], clock=lambda: NOW, new_id=lambda: "x", state=_State())
    status, headers, body = respond(app, "GET", "/metrics", headers=())
    assert status == 200 and body == b"vllm:num_requests_running 0.0\n"
    assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert error_of(respond(make_app(), "GET", "/metrics"))[0] == 404  # a core without a server


# ---- SageMaker's /invocations ----


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
        ({"prompt": "hi", "max_tokens": 2}, "completion"),
    ],
)
def test_invocations_dispatch_generation_by_the_body_shape(body, kind):
    submit = respond(make_app(), "POST", "/invocations", body)
    (generate,) = submit.commands
    assert generate.request_id.startswith("chatcmpl-" if kind == "chat" else "cmpl-")


@pytest.mark.parametrize(
    "body",
    [{"input": "hi"}, {"query": "q", "documents": ["a"]}, {"text_1": "a", "text_2": "b"}],
)
def test_invocations_dispatch_pooling_by_the_body_shape(body):
    assert isinstance(respond(make_app([tiny_pooling_model()]), "POST", "/invocations", body), Submit)


def test_invocations_with_a_body_of_no_known_shape_is_a_400():
    status, error = error_of(respond(make_app(), "POST", "/invocations", {"model": "x"}))
    assert status == 400 and "`messages`" in error["message"] and "`prompt`" in error["message"]
    assert error_of(respond(make_app(), "POST", "/invocations", b"[1]"))[0] == 400


# ---- CORS (vLLM's defaults: any origin, method and header; no credentials) ----

ORIGIN = (b"origin", b"https://app.example")


def test_cors_lets_any_origin_read_by_default():
    status, headers, _ = respond(make_app(), "GET", "/v1/models", headers=(ORIGIN,))
    assert status == 200 and headers[b"access-control-allow-origin"] == b"*"
    assert b"access-control-allow-origin" not in respond(make_app(), "GET", "/v1/models", headers=())[1]


def test_cors_preflight_is_answered_before_auth():
    app = make_app(api_keys=["k"])
    asking = (ORIGIN, (b"access-control-request-method", b"POST"), (b"access-control-request-headers", b"authorization, content-type"))
    status, headers, body = respond(app, "OPTIONS", "/v1/chat/completions", headers=asking)
    assert (status, body) == (200, b"OK")
    assert headers[b"access-control-allow-origin"] == b"*"
    assert b"POST" in headers[b"access-control-allow-methods"]
    assert headers[b"access-control-allow-headers"] == b"authorization, content-type"


def test_cors_with_listed_origins_and_credentials():
    app = make_app(allowed_origins=["https://app.example"], allow_credentials=True, allowed_methods=["POST"])
    status, headers, _ = respond(app, "GET", "/v1/models", headers=(ORIGIN,))
    assert headers[b"access-control-allow-origin"] == b"https://app.example"
    assert headers[b"access-control-allow-credentials"] == b"true" and headers[b"vary"] == b"Origin"
    other = ((b"origin", b"https://evil.example"),)
    assert b"access-control-allow-origin" not in respond(app, "GET", "/v1/models", headers=other)[1]
    refused = respond(app, "OPTIONS", "/v1/models", headers=(*other, (b"access-control-request-method", b"POST")))
    assert refused[0] == 400 and b"origin" in refused[2]
    wrong_method = respond(app, "OPTIONS", "/v1/models", headers=(ORIGIN, (b"access-control-request-method", b"PUT")))
    assert wrong_method[0] == 400 and b"method" in wrong_method[2]
