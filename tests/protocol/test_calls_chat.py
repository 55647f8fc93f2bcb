"""Chat completions end to end through the Sans-IO core, with a scripted engine.

A test plays the runtime: it takes the call's `Submit`, hands the call `Tokens`/`Failed` events
built by hand, and looks at the bytes a client would get.
"""

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Abort,
    App,
    AppConfig,
    Failed,
    TokenLogprobs,
    Tokens,
)
from protocol.testing import EOS_ID, ByteTokenizer, tiny_served_model
from protocol.testing import CallPlayer as Client

NOW = 1_700_000_000.75
JSON_HEADERS = [(b"content-type", b"application/json")]
USER = [{"role": "user", "content": "hi"}]


def make_app(**config):
    ids = itertools.count(1)
    return App(AppConfig(**config), [tiny_served_model()], clock=lambda: NOW, new_id=lambda: f"r{next(ids)}")


def chat(app=None, headers=JSON_HEADERS, **body) -> Client:
    body.setdefault("messages", USER)
    app = app or make_app()
    return Client(app.handle("POST", "/v1/chat/completions", headers, json.dumps(body).encode()))


def tokens(request_id, text_or_ids, index=0, **kw):
    """One engine step for sample `index`: text is turned into byte tokens."""
    ids = tuple(text_or_ids.encode()) if isinstance(text_or_ids, str) else tuple(text_or_ids)
    kw.setdefault("num_prompt_tokens", 10)
    return Tokens(request_id, index, ids, **kw)


def script(request_id, text, index=0, finish="stop", per_step=1):
    """The engine's events producing `text` token by token, then EOS."""
    data = text.encode()
    steps = [tokens(request_id, data[i : i + per_step], index) for i in range(0, len(data), per_step)]
    last_ids = (EOS_ID,) if finish == "stop" else ()
    return [*steps, tokens(request_id, last_ids, index, finish_reason=finish)]


def content_of(events):
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])


# ---- basics ----


def test_start_submits_one_generate_and_commits_nothing():
    client = chat(max_tokens=5, temperature=0)
    assert client.status is None
    generate = client.generate
    assert generate.request_id == "chatcmpl-r1"
    assert generate.params.max_tokens == 5 and generate.params.temperature == 0
    rendered = ByteTokenizer().decode(generate.prompt_token_ids, skip_special_tokens=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert client.call.model == "tiny-byte-model"
    assert not client.call.finished


def test_non_stream_response_with_exact_usage():
    client = chat()
    rid = client.generate.request_id
    client.feed(*script(rid, "Hé là!"))
    assert client.status == 200 and client.headers[b"content-type"] == b"application/json"
    body = client.json()
    assert body["id"] == rid and body["object"] == "chat.completion"
    assert body["created"] == int(NOW) and body["model"] == "tiny-byte-model"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hé là!"
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    prompt_tokens = len(client.generate.prompt_token_ids)
    completion_tokens = len("Hé là!".encode()) + 1  # the EOS token counts
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": None,
    }
    assert client.call.finished


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet="ab €🙂\n", max_size=12), per_step=st.integers(1, 4), n=st.integers(1, 3))
def test_stream_text_equals_non_stream_text(text, per_step, n):
    plain, streamed = chat(n=n), chat(n=n, stream=True)
    for client in (plain, streamed):
        rid = client.generate.request_id
        scripts = [script(rid, text, index=i, per_step=per_step) for i in range(n)]
        for batch in itertools.zip_longest(*scripts):
            client.feed(*[e for e in batch if e is not None])
    full = {c["index"]: c["message"]["content"] for c in plain.json()["choices"]}
    events = streamed.events()
    for i in range(n):
        chunks = [e for e in events if e["choices"] and e["choices"][0]["index"] == i]
        assert content_of(chunks) == full[i] == text


def test_stream_shape_for_n_choices():
    client = chat(n=2, stream=True)
    rid = client.generate.request_id
    a, b = script(rid, "ab", index=0), script(rid, "xyz", index=1)
    client.feed(a[0], b[0])
    assert client.status == 200 and client.headers[b"content-type"].startswith(b"text/event-stream")
    client.feed(a[1], b[1]).feed(b[2], a[2]).feed(b[3])
    events = client.events()
    assert all(len(e["choices"]) == 1 for e in events)
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == rid for e in events)
    assert all(e["created"] == int(NOW) for e in events)
    # first a {role, content: ""} chunk per choice
    assert [e["choices"][0] for e in events[:2]] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
        {"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
    ]
    # then the deltas interleave in engine order
    order = [e["choices"][0]["index"] for e in events[2:]]
    assert order == [0, 1, 0, 1, 1, 0, 1]
    for index, text in ((0, "ab"), (1, "xyz")):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        finishes = [c for c in mine if c["finish_reason"] is not None]
        assert finishes == [mine[-1]]
        assert mine[-1]["finish_reason"] == "stop" and mine[-1]["stop_reason"] is None
        assert all("stop_reason" not in c for c in mine[:-1])
        assert content_of([{"choices": [c]} for c in mine]) == text
    assert "usage" not in events[-1]
    assert client.call.finished


def test_empty_deltas_are_skipped():
    client = chat(stream=True)
    rid = client.generate.request_id
    euro = "€".encode()
    client.feed(tokens(rid, ()))  # a prefill step without tokens
    client.feed(tokens(rid, euro[:1]), tokens(rid, euro[1:2]), tokens(rid, euro[2:]))
    client.feed(tokens(rid, (EOS_ID,), finish_reason="stop"))
    deltas = [e["choices"][0]["delta"] for e in client.events()]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "€"}, {}]


# ---- stop conditions ----


def test_stop_string_across_tokens_aborts_that_sample_only():
    client = chat(n=2, stream=True, stop=["→x"])
    rid = client.generate.request_id
    for event in script(rid, "ok →", index=0)[:-1]:
        client.feed(event)
    arrow_end = tokens(rid, "x and more", index=0)  # completes the stop string mid-token
    client.feed(arrow_end)
    assert client.aborts == [Abort(rid, 0)]
    assert not client.call.finished
    client.feed(tokens(rid, "late", index=0))  # already in flight: ignored
    client.feed(*script(rid, "fine", index=1))
    assert client.call.finished and client.aborts == [Abort(rid, 0)]
    events = client.events()
    zero = [e["choices"][0] for e in events if e["choices"][0]["index"] == 0]
    assert content_of([{"choices": [c]} for c in zero]) == "ok "
    assert (zero[-1]["finish_reason"], zero[-1]["stop_reason"]) == ("stop", "→x")


def test_stop_string_with_multibyte_characters_split_across_tokens():
    client = chat(stop=["é!"])
    rid = client.generate.request_id
    client.feed(*script(rid, "café! more")[:-1])
    (choice,) = client.json()["choices"]
    assert choice["message"]["content"] == "caf"
    assert choice["stop_reason"] == "é!"
    assert client.aborts == [Abort(rid, 0)]


def test_include_stop_str_in_output():
    client = chat(stop=["!"], include_stop_str_in_output=True)
    rid = client.generate.request_id
    client.feed(*script(rid, "Hey! you")[:-1])
    assert client.json()["choices"][0]["message"]["content"] == "Hey!"


def test_stop_token_id_gives_int_stop_reason_and_is_not_shown():
    client = chat(stop_token_ids=[ord(".")])
    rid = client.generate.request_id
    client.feed(tokens(rid, "Done"), tokens(rid, ".", finish_reason="stop", stop_reason=ord(".")))
    (choice,) = client.json()["choices"]
    assert choice["message"]["content"] == "Done"
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", ord("."))
    assert client.aborts == []


def test_length_finish():
    client = chat(max_tokens=3)
    rid = client.generate.request_id
    client.feed(tokens(rid, "ab"), tokens(rid, "c", finish_reason="length"))
    (choice,) = client.json()["choices"]
    assert (choice["message"]["content"], choice["finish_reason"], choice["stop_reason"]) == (
        "abc",
        "length",
        None,
    )


# ---- usage ----


def test_include_usage_adds_a_final_usage_chunk():
    client = chat(n=2, stream=True, stream_options={"include_usage": True})
    rid = client.generate.request_id
    client.feed(*script(rid, "ab", index=0), *script(rid, "cde", index=1))
    events = client.events()
    *chunks, last = events
    assert all("usage" not in e for e in chunks)
    prompt_tokens = len(client.generate.prompt_token_ids)
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 7,
        "total_tokens": prompt_tokens + 7,
    }


def test_continuous_usage_stats_are_cumulative():
    client = chat(n=2, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    rid = client.generate.request_id
    for pair in zip(script(rid, "ab", index=0), script(rid, "cd", index=1), strict=True):
        client.feed(*pair)
    events = client.events()
    prompt_tokens = len(client.generate.prompt_token_ids)
    assert all(e["usage"]["prompt_tokens"] == prompt_tokens for e in events)
    completion = [e["usage"]["completion_tokens"] for e in events]
    assert completion == sorted(completion) and completion[:2] == [0, 0]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    assert events[-2]["usage"] == events[-1]["usage"]


def test_usage_is_not_sent_without_stream_options():
    client = chat(stream=True)
    client.feed(*script(client.generate.request_id, "ab"))
    assert all("usage" not in e for e in client.events())


def test_force_include_usage():
    client = chat(app=make_app(enable_force_include_usage=True), stream=True)
    client.feed(*script(client.generate.request_id, "ab"))
    assert client.events()[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("cached, expected", [(4, {"cached_tokens": 4}), (0, None)])
def test_prompt_tokens_details(cached, expected):
    client = chat(app=make_app(enable_prompt_tokens_details=True))
    rid = client.generate.request_id
    client.feed(tokens(rid, "a", num_cached_tokens=cached), tokens(rid, "b", finish_reason="length"))
    assert client.json()["usage"]["prompt_tokens_details"] == expected


# ---- failures and disconnects ----


def test_failure_before_first_output_keeps_its_status():
    client = chat(stream=True)
    rid = client.generate.request_id
    client.feed(Failed(rid, 400, "Invalid regex"))
    assert client.status == 400 and client.headers[b"content-type"] == b"application/json"
    assert client.json() == {
        "error": {"message": "Invalid regex", "type": "BadRequestError", "param": None, "code": 400}
    }
    assert client.call.finished and client.aborts == []


def test_failure_after_first_output_is_an_sse_error_then_done():
    client = chat(stream=True)
    rid = client.generate.request_id
    client.feed(tokens(rid, "par"))
    client.feed(Failed(rid, 500, "CUDA error"))
    assert client.status == 200
    events = client.events()
    assert events[-1] == {
        "error": {"message": "CUDA error", "type": "InternalServerError", "param": None, "code": 500}
    }
    assert content_of(events[:-1]) == "par"
    assert client.call.finished


def test_non_stream_failure_after_output_still_has_its_status():
    client = chat()
    rid = client.generate.request_id
    client.feed(tokens(rid, "par"), Failed(rid, 503, "engine overloaded"))
    assert client.status == 503
    assert client.json()["error"]["code"] == 503


def test_events_of_other_requests_are_ignored():
    client = chat()
    client.feed(tokens("someone-else", "x"), Failed("someone-else", 500, "boom"))
    assert client.status is None and not client.call.finished


def test_disconnect_aborts_unfinished_work():
    client = chat(stream=True, n=2)
    rid = client.generate.request_id
    client.feed(tokens(rid, "a"))
    assert client.call.disconnected() == [Abort(rid)]
    assert client.call.finished
    assert client.call.disconnected() == []
    assert client.call.feed([tokens(rid, "b")]) == []


def test_disconnect_after_completion_aborts_nothing():
    client = chat()
    client.feed(*script(client.generate.request_id, "a"))
    assert client.call.disconnected() == []


def test_a_bug_while_detokenizing_becomes_a_500_not_an_exception():
    class BrokenTokenizer(ByteTokenizer):
        def decode(self, token_ids, skip_special_tokens=True):
            if 0x21 in token_ids:  # "!"
                raise RuntimeError("tokenizer bug")
            return super().decode(token_ids, skip_special_tokens)

    model = tiny_served_model()
    model.tokenizer = BrokenTokenizer()
    app = App(AppConfig(), [model], clock=lambda: NOW, new_id=lambda: "x")
    client = chat(app=app, stream=True)
    rid = client.generate.request_id
    client.feed(tokens(rid, "ok"), tokens(rid, "!"))
    events = client.events()
    assert events[-1]["error"]["code"] == 500
    assert client.aborts == [Abort(rid)]


# ---- logprobs ----


def test_chat_logprobs_shape():
    client = chat(logprobs=True, top_logprobs=2)
    rid = client.generate.request_id
    assert client.generate.params.logprobs == 2
    entries = (
        TokenLogprobs(ord("a"), -0.5, 1, ((ord("a"), -0.5), (ord("b"), -1.5), (ord("c"), -2.0))),
        TokenLogprobs(EOS_ID, float("-inf"), 7, ((ord("z"), -0.1), (EOS_ID, float("-inf")))),
    )
    client.feed(tokens(rid, (ord("a"), EOS_ID), logprobs=entries, finish_reason="stop"))
    content = client.json()["choices"][0]["logprobs"]["content"]
    assert content == [
        {
            "token": "a",
            "logprob": -0.5,
            "bytes": [97],
            "top_logprobs": [
                {"token": "a", "logprob": -0.5, "bytes": [97]},
                {"token": "b", "logprob": -1.5, "bytes": [98]},
            ],
        },
        {
            "token": "</s>",
            "logprob": -9999.0,
            "bytes": list(b"</s>"),
            "top_logprobs": [
                {"token": "z", "logprob": -0.1, "bytes": [122]},
                {"token": "</s>", "logprob": -9999.0, "bytes": list(b"</s>")},
            ],
        },
    ]


def test_chat_logprobs_stream_and_token_ids():
    client = chat(app=make_app(return_tokens_as_token_ids=True), stream=True, logprobs=True)
    rid = client.generate.request_id
    client.feed(tokens(rid, "a", logprobs=(TokenLogprobs(97, -0.25, 1),), finish_reason="length"))
    last = client.events()[-1]["choices"][0]
    assert last["logprobs"] == {
        "content": [
            {"token": "token_id:97", "logprob": -0.25, "bytes": list(b"token_id:97"), "top_logprobs": []}
        ]
    }


def test_return_token_ids():
    client = chat(return_token_ids=True)
    rid = client.generate.request_id
    client.feed(tokens(rid, "ab", finish_reason="length"))
    body = client.json()
    assert body["prompt_token_ids"] == list(client.generate.prompt_token_ids)
    assert body["choices"][0]["token_ids"] == [97, 98]


# ---- templates, roles, echo ----


def test_continue_final_message_with_echo_and_role():
    messages = [*USER, {"role": "assistant", "content": "The answer is"}]
    client = chat(messages=messages, add_generation_prompt=False, continue_final_message=True, echo=True)
    rendered = ByteTokenizer().decode(client.generate.prompt_token_ids, skip_special_tokens=False)
    assert rendered.endswith("<|im_start|>assistant\nThe answer is")
    client.feed(*script(client.generate.request_id, " 42"))
    message = client.json()["choices"][0]["message"]
    assert message == {**message, "role": "assistant", "content": "The answer is 42"}


def test_echo_in_a_stream_comes_after_the_role_chunk():
    messages = [*USER, {"role": "assistant", "content": "Sure"}]
    client = chat(
        messages=messages, add_generation_prompt=False, continue_final_message=True, echo=True, stream=True
    )
    client.feed(*script(client.generate.request_id, "!"))
    deltas = [e["choices"][0]["delta"] for e in client.events()]
    assert deltas[:3] == [{"role": "assistant", "content": ""}, {"content": "Sure"}, {"content": "!"}]


def test_response_role_is_the_last_role_without_generation_prompt():
    messages = [{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}]
    client = chat(messages=messages, add_generation_prompt=False)
    client.feed(*script(client.generate.request_id, "c"))
    assert client.json()["choices"][0]["message"]["role"] == "narrator"


def test_configured_response_role():
    client = chat(app=make_app(response_role="bot"))
    client.feed(*script(client.generate.request_id, "c"))
    assert client.json()["choices"][0]["message"]["role"] == "bot"


def test_request_chat_template_needs_trust():
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    refused = chat(chat_template=template)
    assert refused.status == 400
    assert "--trust-request-chat-template" in refused.json()["error"]["message"]
    trusted = chat(app=make_app(trust_request_chat_template=True), chat_template=template)
    assert bytes(trusted.generate.prompt_token_ids) == b"[hi]"


def test_server_chat_template_and_kwargs():
    app = make_app(chat_template="{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    client = chat(app=app, chat_template_kwargs={"greeting": "Yo: "})
    assert bytes(client.generate.prompt_token_ids) == b"Yo: hi"


def test_tools_reach_the_template_and_tool_choice_none_keeps_output_content():
    app = make_app(
        chat_template="{% for t in tools %}<{{ t.function.name }}>{% endfor %}{{ messages[0]['content'] }}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    client = chat(app=app, tools=tools, tool_choice="none")
    assert bytes(client.generate.prompt_token_ids) == b"<get_weather>hi"
    client.feed(*script(client.generate.request_id, "sunny"))
    message = client.json()["choices"][0]["message"]
    assert message["content"] == "sunny" and message["tool_calls"] == []


@pytest.mark.parametrize(
    "template", ["{% for m in messages %}", "{{ raise_exception('no system role') }}", "{{ 1 / 0 }}"]
)
def test_broken_templates_are_client_errors(template):
    client = chat(app=make_app(trust_request_chat_template=True), chat_template=template)
    assert client.status == 400 and client.json()["error"]["type"] == "BadRequestError"


def test_model_without_template():
    model = tiny_served_model()
    model.tokenizer = ByteTokenizer(chat_template=None)
    client = chat(app=App(AppConfig(), [model], clock=lambda: NOW, new_id=lambda: "x"))
    assert client.status == 400 and "chat template" in client.json()["error"]["message"]


def test_context_length_is_checked_on_the_rendered_prompt():
    client = chat(messages=[{"role": "user", "content": "x" * 300}])
    assert client.status == 400
    assert "maximum context length is 256 tokens" in client.json()["error"]["message"]


def test_validation_errors_are_400():
    client = chat(n=0)
    assert client.status == 400 and client.call.finished


# ---- ids ----


def test_request_id_from_header_then_body_then_factory():
    # The response id keeps the client's id; the engine's id gets a fresh suffix when the client chose it.
    from_header = chat(headers=[*JSON_HEADERS, (b"x-request-id", b"hdr")], request_id="body")
    assert from_header.call.response_id == "chatcmpl-hdr"
    assert from_header.generate.request_id.startswith("chatcmpl-hdr-")
    from_body = chat(request_id="body")
    assert from_body.call.response_id == "chatcmpl-body"
    assert from_body.generate.request_id.startswith("chatcmpl-body-")
    assert chat().generate.request_id == "chatcmpl-r1"


def test_cache_salt_reaches_the_engine_request():
    assert chat(cache_salt="tenant-7").generate.cache_salt == "tenant-7"
    assert chat().generate.cache_salt is None


# ---- lax scalars, as vLLM's pydantic models take them ----


def test_scalars_written_as_strings_are_accepted_as_vllm_does():
    client = chat(max_tokens="2", temperature="0", stream="false", logprobs="true", top_logprobs=2.0, n="1")
    params = client.generate.params
    assert (params.max_tokens, params.temperature, params.logprobs, params.n) == (2, 0.0, 2, 1)
    client.feed(*script(client.generate.request_id, "ok"))
    assert client.status == 200 and client.json()["choices"][0]["message"]["content"] == "ok"  # not a stream


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("temperature", "nan", "temperature must be a finite number"),
        ("top_p", "inf", "top_p must be a finite number"),
        ("presence_penalty", "-inf", "presence_penalty must be a finite number"),
        ("max_tokens", "two", "max_tokens"),
        ("max_tokens", 2.5, "max_tokens"),
        ("stream", "maybe", "stream"),
    ],
)
def test_scalars_that_are_not_numbers_are_400s(field, value, fragment):
    client = chat(**{field: value})
    assert client.status == 400 and not client.commands
    error = client.json()["error"]
    assert fragment in error["message"] and error["param"] == field, error


def test_an_engine_at_capacity_is_a_503_with_retry_after():
    client = chat()
    client.feed(Failed(client.generate.request_id, 503, "The server is at capacity: retry shortly."))
    assert client.status == 503 and client.headers[b"retry-after"] == b"1"
    assert client.json()["error"]["message"] == "The server is at capacity: retry shortly."
