"""/v1/embeddings, /pooling and /classify through the Sans-IO core, with a scripted engine.

A test plays the runtime: it takes the call's `Submit` of `Encode`s, hands the call `Pooled` /
`Failed` events built by hand, and looks at what a client receives.
"""

import base64
import itertools
import json

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import Abort, App, AppConfig, Encode, Failed, Pooled, StartResponse, Submit
from protocol.testing import BOS_ID, ByteTokenizer, tiny_pooling_model, tiny_served_model
from tests.protocol.test_calls_chat import Client

NOW = 1_700_000_321.5
JSON_HEADERS = [(b"content-type", b"application/json")]
USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}


def make_app(*models, **config):
    ids = itertools.count(1)
    models = list(models) or [tiny_pooling_model()]
    return App(AppConfig(**config), models, clock=lambda: NOW, new_id=lambda: f"r{next(ids)}")


class PoolingClient(Client):
    @property
    def encodes(self) -> list[Encode]:
        return [c for c in self.commands if isinstance(c, Encode)]

    def answer(self, *vectors, tokens=None):
        """One `Pooled` per `Encode`, in order; `num_prompt_tokens` is the prompt's length unless given."""
        events = [
            Pooled(
                encode.request_id, tuple(vector), len(encode.prompt_token_ids) if tokens is None else tokens
            )
            for encode, vector in zip(self.encodes, vectors, strict=True)
        ]
        return self.feed(*events)

    def error(self):
        body = self.json()
        assert set(body) == {"error"} and body["error"]["code"] == self.status
        return body["error"]


def post(path, app=None, headers=JSON_HEADERS, **body):
    app = app or make_app()
    return PoolingClient(app.handle("POST", path, headers, json.dumps(body).encode()))


def embed(app=None, **body):
    return post("/v1/embeddings", app, **body)


def error_of(client):
    assert client.ended and client.status >= 400 and not client.encodes
    return client.error()


def ids(text, special=True):
    return ((BOS_ID,) if special else ()) + tuple(text.encode())


# ---- /v1/embeddings: shapes ----


def test_embeddings_submit_one_encode_per_input_and_answer_in_input_order():
    client = embed(input=["hi", "there"])
    assert client.status is None and not client.call.finished
    first, second = client.encodes
    assert (first.request_id, second.request_id) == ("embd-r1-0", "embd-r1-1")
    assert first.prompt_token_ids == ids("hi") and second.prompt_token_ids == ids("there")
    assert first.params.task == "embed" and first.params.normalize is None and first.params.dimensions is None
    assert first.token_type_ids is None and first.priority == 0
    assert client.call.model == "tiny-pooling-model"
    # the second input's vector arrives first, in its own engine step
    client.feed(Pooled(second.request_id, (0.0, 1.0), 6))
    assert client.status is None and not client.call.finished
    client.feed(Pooled(first.request_id, (0.5, -0.25), 3))
    assert client.status == 200 and client.call.finished
    assert client.headers[b"content-type"] == b"application/json"
    assert client.json() == {
        "id": "embd-r1",
        "object": "list",
        "created": int(NOW),
        "model": "tiny-pooling-model",
        "data": [
            {"index": 0, "object": "embedding", "embedding": [0.5, -0.25]},
            {"index": 1, "object": "embedding", "embedding": [0.0, 1.0]},
        ],
        "usage": {
            "prompt_tokens": 9,
            "total_tokens": 9,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
    }


def test_usage_counts_the_prompt_tokens_the_engine_reports():
    client = embed(input=["a", "b", "c"]).answer([1.0], [1.0], [1.0], tokens=7)
    assert client.json()["usage"]["prompt_tokens"] == 21 and client.json()["usage"]["total_tokens"] == 21


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hi", [ids("hi")]),
        (["a", "bc"], [ids("a"), ids("bc")]),
        ([5, 6, 7], [(5, 6, 7)]),
        ([[5, 6], [7]], [(5, 6), (7,)]),
    ],
)
def test_every_input_form(value, expected):
    assert [e.prompt_token_ids for e in embed(input=value).encodes] == expected


def test_add_special_tokens_false():
    assert embed(input="hi", add_special_tokens=False).encodes[0].prompt_token_ids == ids("hi", special=False)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([], "`input` cannot be empty"),
        ("", "`input` is an empty string"),
        (["a", ""], "`input[1]` is an empty string"),
        ([[1], []], "`input[1]` is an empty list of token ids"),
        ([9999], "Token id 9999 is out of vocabulary"),
        ([[1], [-1]], "Token id -1 is out of vocabulary"),
        (["a", 1], "value_error"),
        ([1.5], "value_error"),
        ({"text": "a"}, "input"),
    ],
)
def test_bad_inputs_are_400(value, words):
    error = error_of(embed(input=value))
    assert error["code"] == 400 and words in error["message"]


def test_missing_input_is_400():
    error = error_of(embed(model="tiny-pooling-model"))
    assert "missing" in error["message"] and error["param"] == "input"


# ---- encodings ----


def openai_decode(value):
    """What the official `openai` client does with a base64 embedding."""
    return numpy.frombuffer(base64.b64decode(value), dtype="float32").tolist()


VECTOR = (0.1, -0.2, 3.5, 1e-8, -0.0)


def test_base64_is_little_endian_float32_as_the_openai_client_decodes_it():
    client = embed(input=["a", "b"], encoding_format="base64").answer(VECTOR, (1.0, 2.0, 3.0, 4.0, 5.0))
    body = client.json()
    assert [item["object"] for item in body["data"]] == ["embedding", "embedding"]
    assert openai_decode(body["data"][0]["embedding"]) == numpy.array(VECTOR, dtype="float32").tolist()
    assert openai_decode(body["data"][1]["embedding"]) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert body["usage"]["prompt_tokens"] == 4


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("endianness", ["little", "big", "native"])
def test_base64_embed_dtype_and_endianness(dtype, endianness):
    client = embed(input="a", encoding_format="base64", embed_dtype=dtype, endianness=endianness)
    value = client.answer(VECTOR).json()["data"][0]["embedding"]
    order = {"little": "<", "big": ">", "native": "="}[endianness]
    decoded = numpy.frombuffer(base64.b64decode(value), dtype=numpy.dtype(dtype).newbyteorder(order))
    assert decoded.tolist() == numpy.array(VECTOR, dtype=dtype).tolist()


def test_base64_bfloat16_is_the_upper_half_of_float32_rounded_to_even():
    value = embed(input="a", encoding_format="base64", embed_dtype="bfloat16", endianness="big").answer(
        (1.0, 1 / 3, -2.0)
    )
    raw = base64.b64decode(value.json()["data"][0]["embedding"])
    assert raw == bytes.fromhex("3f803eabc000")


def test_bytes_format_is_a_raw_body_described_by_a_metadata_header():
    client = embed(input=["a", "bb"], encoding_format="bytes").answer((1.0, 2.0), (3.0, -4.0))
    assert client.status == 200 and client.headers[b"content-type"] == b"application/octet-stream"
    metadata = json.loads(client.headers[b"metadata"])
    assert metadata == {
        "id": "embd-r1",
        "created": int(NOW),
        "model": "tiny-pooling-model",
        "data": [
            {
                "index": 0,
                "embed_dtype": "float32",
                "endianness": "native",
                "start": 0,
                "end": 8,
                "shape": [2],
            },
            {
                "index": 1,
                "embed_dtype": "float32",
                "endianness": "native",
                "start": 8,
                "end": 16,
                "shape": [2],
            },
        ],
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    assert numpy.frombuffer(client.body, dtype="float32").tolist() == [1.0, 2.0, 3.0, -4.0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("encoding_format", "hex"), ("embed_dtype", "float64"), ("endianness", "middle")],
)
def test_bad_literals_are_pydantic_style_400s(field, value):
    error = error_of(embed(input="a", **{field: value}))
    assert "literal_error" in error["message"] and repr(value) in error["message"] and error["param"] == field


def test_the_real_openai_client_reads_the_default_base64_answer():
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    app = make_app()

    def handler(request):
        client = PoolingClient(
            app.handle(request.method, request.url.path, list(request.headers.raw), request.content)
        )
        if client.encodes:
            client.answer(*[VECTOR for _ in client.encodes])
        return httpx.Response(client.status, headers=list(client.headers.items()), content=client.body)

    transport = httpx.MockTransport(handler)
    api = openai.OpenAI(api_key="k", base_url="http://test/v1", http_client=httpx.Client(transport=transport))
    response = api.embeddings.create(model="tiny-pooling-model", input=["x", "yz"])
    assert [item.embedding for item in response.data] == [numpy.array(VECTOR, dtype="float32").tolist()] * 2
    assert response.usage.prompt_tokens == 5 and response.id == "embd-r1"


# ---- dimensions, normalize ----


def test_dimensions_need_a_matryoshka_model():
    error = error_of(embed(input="a", dimensions=4))
    assert error["message"] == (
        'Model "tiny-pooling-model" does not support matryoshka representation, '
        "changing output dimensions will lead to poor results."
    )
    assert error["param"] == "dimensions"


def test_dimensions_must_be_one_of_the_matryoshka_sizes():
    app = make_app(tiny_pooling_model(is_matryoshka=True, matryoshka_dimensions=[2, 4], hidden_size=8))
    error = error_of(embed(app, input="a", dimensions=3))
    assert error["message"] == (
        'Model "tiny-pooling-model" only supports [2, 4] matryoshka dimensions, '
        "use other output dimensions will lead to poor results."
    )
    client = embed(app, input="a", dimensions=4)
    assert client.encodes[0].params.dimensions == 4
    assert client.answer((0.5, 0.5, 0.5, 0.5)).json()["data"][0]["embedding"] == [0.5] * 4


def test_dimensions_on_a_matryoshka_model_without_a_size_list():
    app = make_app(tiny_pooling_model(is_matryoshka=True, hidden_size=8))
    assert error_of(embed(app, input="a", dimensions=0))["message"] == "Dimensions must be greater than 0"
    assert error_of(embed(app, input="a", dimensions=-3))["message"] == "Dimensions must be greater than 0"
    assert "cannot return 9" in error_of(embed(app, input="a", dimensions=9))["message"]
    assert embed(app, input="a", dimensions=8).encodes[0].params.dimensions == 8


def test_normalize_reaches_the_engine():
    assert embed(input="a", normalize=False).encodes[0].params.normalize is False
    assert embed(input="a", normalize=True).encodes[0].params.normalize is True


# ---- length and truncation ----


def test_an_input_may_fill_the_context_but_not_more():
    app = make_app(tiny_pooling_model(max_model_len=5))
    assert embed(app, input="abcd").encodes[0].prompt_token_ids == ids("abcd")  # 5 tokens with <s>
    error = error_of(embed(app, input=["a", "abcde"]))
    assert error["message"] == (
        "This model's maximum context length is 5 tokens. However, you requested 6 tokens in the input "
        "for embedding generation. Please reduce the length of the input."
    )
    assert error["param"] == "input"


def test_truncate_prompt_tokens_keeps_the_last_tokens_and_the_special_ones():
    app = make_app(tiny_pooling_model(max_model_len=5))
    assert embed(app, input="abcdefgh", truncate_prompt_tokens=3).encodes[0].prompt_token_ids == (
        BOS_ID,
        *b"gh",
    )
    assert embed(app, input="abcdefgh", truncate_prompt_tokens=-1).encodes[0].prompt_token_ids == (
        BOS_ID,
        *b"efgh",
    )
    assert embed(app, input=[1, 2, 3, 4], truncate_prompt_tokens=2).encodes[0].prompt_token_ids == (3, 4)
    assert embed(app, input="ab", truncate_prompt_tokens=4).encodes[0].prompt_token_ids == ids("ab")


def test_truncate_prompt_tokens_past_the_context_is_400():
    error = error_of(
        embed(make_app(tiny_pooling_model(max_model_len=5)), input="a", truncate_prompt_tokens=6)
    )
    assert error["message"] == (
        "truncate_prompt_tokens value (6) is greater than max_model_len (5). "
        "Please, select a smaller truncation size."
    )
    assert "greater_than_equal" in error_of(embed(input="a", truncate_prompt_tokens=-2))["message"]


# ---- chat-style embeddings ----


def test_chat_embeddings_render_the_template_without_a_generation_prompt():
    messages = [{"role": "user", "content": "hi"}]
    rendered = ByteTokenizer().decode(
        embed(messages=messages).encodes[0].prompt_token_ids, skip_special_tokens=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"
    with_prompt = embed(messages=messages, add_generation_prompt=True, add_special_tokens=True).encodes[0]
    assert ByteTokenizer().decode(with_prompt.prompt_token_ids, skip_special_tokens=False) == (
        "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_embeddings_validate_like_chat():
    error = error_of(
        embed(
            messages=[{"role": "user", "content": "x"}],
            add_generation_prompt=True,
            continue_final_message=True,
        )
    )
    assert error["message"] == "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    assert "chat template" in error_of(embed(messages=[{"role": "user"}], chat_template="{{ x }}"))["message"]
    assert error_of(embed(messages=[{"content": "no role"}]))["code"] == 400
    app = make_app(tiny_pooling_model(max_model_len=8))
    assert (
        "for embedding generation"
        in error_of(embed(app, messages=[{"role": "user", "content": "hi"}]))["message"]
    )


# ---- ids, priority, models ----


def test_body_request_id_and_header_name_the_response():
    assert embed(input="a", request_id="mine").answer((1.0,)).json()["id"] == "embd-mine"
    client = embed(headers=[*JSON_HEADERS, (b"x-request-id", b"trace-7")], input="a")
    assert client.encodes[0].request_id.startswith("embd-trace-7-")
    assert client.answer((1.0,)).json()["id"] == "embd-trace-7"


def test_priority_needs_priority_scheduling():
    assert "Priority scheduling is not enabled" in error_of(embed(input="a", priority=3))["message"]
    assert embed(make_app(allow_priority=True), input="a", priority=3).encodes[0].priority == 3


@pytest.mark.parametrize(
    ("path", "api", "body"),
    [
        ("/v1/embeddings", "Embeddings", {"input": "a"}),
        ("/pooling", "Pooling", {"input": "a"}),
        ("/classify", "Classification", {"input": "a"}),
        ("/score", "Score", {"text_1": "a", "text_2": "b"}),
        ("/v1/score", "Score", {"text_1": "a", "text_2": "b"}),
        ("/rerank", "Rerank", {"query": "a", "documents": ["b"]}),
        ("/v1/rerank", "Rerank", {"query": "a", "documents": ["b"]}),
        ("/v2/rerank", "Rerank", {"query": "a", "documents": ["b"]}),
    ],
)
def test_a_generative_model_refuses_the_pooling_apis(path, api, body):
    error = error_of(post(path, make_app(tiny_served_model()), **body))
    assert error["message"] == f"The model does not support {api} API" and error["param"] == "model"


def test_a_model_without_the_task_refuses_its_api():
    classifier = make_app(tiny_pooling_model(("classify",)))
    assert error_of(embed(classifier, input="a"))["message"] == "The model does not support Embeddings API"
    embedder = make_app(tiny_pooling_model(("embed",)))
    assert (
        error_of(post("/classify", embedder, input="a"))["message"]
        == "The model does not support Classification API"
    )


@pytest.mark.parametrize(
    ("path", "api"), [("/v1/chat/completions", "Chat Completions"), ("/v1/completions", "Completions")]
)
def test_a_pooling_model_refuses_generation(path, api):
    body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    error = error_of(post(path, make_app(), **body))
    assert error["message"] == f"The model does not support {api} API"


def test_unknown_model_is_404():
    error = error_of(embed(input="a", model="nope"))
    assert error["code"] == 404 and error["message"] == "The model `nope` does not exist."


# ---- engine failures and disconnects ----


def test_a_failure_keeps_its_status_and_aborts_the_other_inputs():
    client = embed(input=["a", "b", "c"])
    first, second, third = client.encodes
    client.feed(Pooled(first.request_id, (1.0,), 2))
    client.feed(Failed(second.request_id, 503, "engine overloaded"))
    assert client.status == 503 and client.call.finished
    assert client.error() == {
        "message": "engine overloaded",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }
    assert client.aborts == [Abort(third.request_id)]
    client.feed(Pooled(third.request_id, (1.0,), 2))  # late events change nothing
    assert client.call.disconnected() == []


def test_disconnect_aborts_only_the_unfinished_inputs():
    client = embed(input=["a", "b", "c"])
    first, second, third = client.encodes
    client.feed(Pooled(second.request_id, (1.0,), 2))
    assert client.call.disconnected() == [Abort(first.request_id), Abort(third.request_id)]
    assert client.call.finished and client.call.disconnected() == []
    assert client.call.feed([Pooled(first.request_id, (1.0,), 2)]) == []


def test_a_finished_call_has_nothing_to_abort():
    client = embed(input="a").answer((1.0,))
    assert client.call.disconnected() == []


def test_foreign_and_repeated_events_are_ignored():
    client = embed(input=["a", "b"])
    first, second = client.encodes
    client.feed(Pooled("someone-else", (9.0,), 1), Pooled(first.request_id, (1.0,), 2))
    client.feed(Pooled(first.request_id, (7.0,), 2), Failed("someone-else", 500, "x"))
    assert client.status is None
    client.feed(Pooled(second.request_id, (2.0,), 2))
    assert [item["embedding"] for item in client.json()["data"]] == [[1.0], [2.0]]


def test_a_malformed_engine_output_is_a_500_not_an_exception():
    client = embed(input="a")
    client.feed(Pooled(client.encodes[0].request_id, ((1.0, 2.0),), 2))  # rows where a vector belongs
    assert client.status == 500 and "Internal server error" in client.error()["message"]


# ---- /pooling ----


def pool(app=None, **body):
    return post("/pooling", app, **body)


def test_pooling_an_embedding_model():
    client = pool(input=["a", "b"], normalize=False)
    assert [e.request_id for e in client.encodes] == ["pool-r1-0", "pool-r1-1"]
    assert client.encodes[0].params.task == "embed" and client.encodes[0].params.normalize is False
    body = client.answer((1.0, 2.0), (3.0, 4.0)).json()
    assert body == {
        "id": "pool-r1",
        "object": "list",
        "created": int(NOW),
        "model": "tiny-pooling-model",
        "data": [
            {"index": 0, "object": "pooling", "data": [1.0, 2.0]},
            {"index": 1, "object": "pooling", "data": [3.0, 4.0]},
        ],
        "usage": {
            "prompt_tokens": 4,
            "total_tokens": 4,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
    }


def test_pooling_defaults_to_the_per_token_task_and_answers_rows():
    app = make_app(tiny_pooling_model(("embed", "token_embed")))
    client = pool(app, input="ab")
    assert client.encodes[0].params.task == "token_embed"
    rows = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5))
    assert client.answer(rows).json()["data"][0]["data"] == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    encoded = pool(app, input="ab", encoding_format="base64").answer(rows).json()["data"][0]["data"]
    assert openai_decode(encoded) == [1.0, 0.0, 0.0, 1.0, 0.5, 0.5]
    raw = pool(app, input="ab", encoding_format="bytes").answer(rows)
    assert json.loads(raw.headers[b"metadata"])["data"][0]["shape"] == [3, 2]
    assert pool(app, input="ab", task="embed").encodes[0].params.task == "embed"


def test_pooling_task_must_be_served():
    error = error_of(pool(input="a", task="classify"))
    assert (
        error["message"] == "Task classify is not supported, it should be one of ['embed']."
        and error["param"] == "task"
    )
    assert error_of(pool(input="a", task="plugin"))["code"] == 400


def test_pooling_parameters_must_fit_the_task():
    app = make_app(tiny_pooling_model(("classify", "embed")))
    error = error_of(pool(app, input="a", task="classify", dimensions=2))
    assert error["message"] == (
        "Task classify only supports ['use_activation'] parameters, does not support ['dimensions'] parameters"
    )
    error = error_of(pool(app, input="a", task="embed", use_activation=True))
    assert error["message"] == (
        "Task embed only supports ['dimensions', 'normalize'] parameters, does not support ['use_activation'] "
        "parameters"
    )
    assert (
        pool(app, input="a", task="classify", use_activation=False).encodes[0].params.use_activation is False
    )
    assert pool(app, input="a", task="classify", softmax=False).encodes[0].params.use_activation is False


def test_pooling_chat_style():
    client = pool(messages=[{"role": "user", "content": "hi"}], task="embed")
    assert ByteTokenizer().decode(client.encodes[0].prompt_token_ids, skip_special_tokens=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


# ---- /classify ----

LABELS = {0: "negative", 1: "positive"}


def classify(app=None, **body):
    return post("/classify", app or make_app(tiny_pooling_model(("classify",), id2label=LABELS)), **body)


def test_classify_names_the_top_class():
    client = classify(input=["good", "bad"])
    first, second = client.encodes
    assert first.request_id == "classify-r1-0" and first.params.task == "classify"
    assert first.params.use_activation is None
    body = client.answer((0.2, 0.8), (0.9, 0.1)).json()
    assert body == {
        "id": "classify-r1",
        "object": "list",
        "created": int(NOW),
        "model": "tiny-pooling-model",
        "data": [
            {"index": 0, "label": "positive", "probs": [0.2, 0.8], "num_classes": 2},
            {"index": 1, "label": "negative", "probs": [0.9, 0.1], "num_classes": 2},
        ],
        "usage": {
            "prompt_tokens": 9,
            "total_tokens": 9,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
    }


def test_classify_without_a_label_name_and_ties():
    body = classify(input="x").answer((0.1, 0.4, 0.4)).json()
    assert body["data"][0]["label"] == "positive"  # the first of equal maxima, as argmax
    unnamed = classify(make_app(tiny_pooling_model(("classify",))), input="x").answer((0.1, 0.9)).json()
    assert unnamed["data"][0]["label"] is None and unnamed["data"][0]["num_classes"] == 2


def test_classify_options():
    assert classify(input="x", use_activation=False).encodes[0].params.use_activation is False
    assert classify(input="x", activation=True).encodes[0].params.use_activation is True
    assert classify(input=[[1, 2]]).encodes[0].prompt_token_ids == (1, 2)
    error = error_of(classify(make_app(tiny_pooling_model(("classify",), max_model_len=3)), input="abc"))
    assert "tokens in the input for classification." in error["message"]
    chat = classify(messages=[{"role": "user", "content": "x"}])
    assert chat.encodes[0].prompt_token_ids[0] != BOS_ID


# ---- robustness ----


POOLING_MODELS = [
    tiny_pooling_model(("embed",), max_model_len=16),
    tiny_pooling_model(("classify", "score"), max_model_len=16, id2label=LABELS),
    tiny_pooling_model(("embed", "token_embed", "token_classify"), is_matryoshka=True, max_model_len=16),
]
LEAVES = st.none() | st.booleans() | st.integers(-3, 300) | st.floats() | st.text(max_size=6)
KEYS = [
    "input",
    "messages",
    "encoding_format",
    "dimensions",
    "task",
    "text_1",
    "text_2",
    "queries",
    "documents",
    "query",
    "top_n",
    "truncate_prompt_tokens",
    "embed_dtype",
    "use_activation",
    "role",
    "content",
    "text",
]


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(POOLING_MODELS),
    path=st.sampled_from(["/v1/embeddings", "/pooling", "/classify", "/score", "/rerank", "/v2/rerank"]),
    body=st.recursive(
        LEAVES,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
        max_leaves=14,
    ),
    vector=st.lists(st.floats(-2, 2), min_size=1, max_size=4),
)
def test_no_pooling_request_produces_a_500(model, path, body, vector):
    call = make_app(model).handle("POST", path, JSON_HEADERS, json.dumps(body).encode())
    outputs = call.start()
    if isinstance(outputs[0], StartResponse):
        assert outputs[0].status < 500
        return
    (submit,) = outputs
    assert isinstance(submit, Submit) and submit.commands
    events = []
    for encode in submit.commands:
        per_token = encode.params.task.startswith("token_")
        data = tuple(tuple(vector) for _ in encode.prompt_token_ids) if per_token else tuple(vector)
        events.append(Pooled(encode.request_id, data, len(encode.prompt_token_ids)))
    outputs = call.feed(events)
    assert call.finished and outputs[0].status == 200, outputs
