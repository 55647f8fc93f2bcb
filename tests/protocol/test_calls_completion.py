"""Completions through the Sans-IO core with a scripted engine: prompts x n, echo, logprobs, chunks."""

import itertools
import json

from protocol import Abort, App, AppConfig, Failed, TokenLogprobs, Tokens
from protocol.testing import BOS_ID, EOS_ID, tiny_served_model
from tests.protocol.test_calls_chat import Client

NOW = 1_700_000_123.0
JSON_HEADERS = [(b"content-type", b"application/json")]
CHUNK_CHOICE_KEYS = {
    "index",
    "text",
    "logprobs",
    "finish_reason",
    "stop_reason",
    "token_ids",
    "prompt_token_ids",
}


def make_app(**config):
    ids = itertools.count(1)
    return App(AppConfig(**config), [tiny_served_model()], clock=lambda: NOW, new_id=lambda: f"r{next(ids)}")


def complete(app=None, **body):
    app = app or make_app()
    return Client(app.handle("POST", "/v1/completions", JSON_HEADERS, json.dumps(body).encode()))


def tokens(request_id, text_or_ids, index=0, **kw):
    ids = tuple(text_or_ids.encode()) if isinstance(text_or_ids, str) else tuple(text_or_ids)
    kw.setdefault("num_prompt_tokens", 3)
    return Tokens(request_id, index, ids, **kw)


def script(request_id, text, index=0):
    return [
        *(tokens(request_id, bytes([b]), index) for b in text.encode()),
        tokens(request_id, (EOS_ID,), index, finish_reason="stop"),
    ]


def test_prompts_times_n_give_interleaved_indices_and_exact_usage():
    client = complete(prompt=["ab", "cde"], n=2, max_tokens=4)
    first, second = client.generates
    assert (first.request_id, second.request_id) == ("cmpl-r1-0", "cmpl-r1-1")
    assert first.prompt_token_ids == (BOS_ID, *b"ab") and second.prompt_token_ids == (BOS_ID, *b"cde")
    assert first.params.n == second.params.n == 2
    client.feed(*script(second.request_id, "z", 1), *script(first.request_id, "x", 0))
    assert not client.call.finished
    client.feed(*script(first.request_id, "yy", 1), *script(second.request_id, "w", 0))
    body = client.json()
    assert body["id"] == "cmpl-r1" and body["object"] == "text_completion" and body["created"] == int(NOW)
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "x"), (1, "yy"), (2, "w"), (3, "z")]
    assert body["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 9,
        "total_tokens": 16,
        "prompt_tokens_details": None,
    }


def test_token_id_prompts():
    client = complete(prompt=[[5, 6], [7]], max_tokens=1)
    assert [g.prompt_token_ids for g in client.generates] == [(5, 6), (7,)]
    assert complete(prompt=[1, 2, 3]).generates[0].prompt_token_ids == (1, 2, 3)
    bad = complete(prompt=[9999])
    assert bad.status == 400 and "out of vocabulary" in bad.json()["error"]["message"]


def test_stream_chunks_carry_every_key_and_match_the_full_text():
    plain, streamed = complete(prompt="hi"), complete(prompt="hi", stream=True)
    for client in (plain, streamed):
        client.feed(*script(client.generates[0].request_id, "héllo"))
    events = streamed.events()
    assert all(set(e) == {"id", "object", "created", "model", "choices", "usage"} for e in events)
    assert all(set(e["choices"][0]) == CHUNK_CHOICE_KEYS and e["usage"] is None for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == plain.json()["choices"][0]["text"] == "héllo"
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "stop"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_stream_usage_chunk_and_continuous_usage():
    client = complete(
        prompt=["a", "b"], stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
    )
    one, two = client.generates
    client.feed(*script(one.request_id, "x"), *script(two.request_id, "yz"))
    events = client.events()
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [1, 2, 3, 4, 5]
    assert events[-1] == {
        "id": "cmpl-r1",
        "object": "text_completion",
        "created": int(NOW),
        "model": "tiny-byte-model",
        "choices": [],
        "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
    }


def test_echo_prepends_the_prompt():
    client = complete(prompt="Say:", echo=True)
    client.feed(*script(client.generates[0].request_id, " ok"))
    assert client.json()["choices"][0]["text"] == "Say: ok"
    streamed = complete(prompt=[83, 97, 121], echo=True, stream=True)
    streamed.feed(*script(streamed.generates[0].request_id, "!"))
    texts = [e["choices"][0]["text"] for e in streamed.events()]
    assert texts[0].startswith("Say") and "".join(texts) == "Say!"


def test_echo_only_with_max_tokens_zero():
    client = complete(prompt="Just this", echo=True, max_tokens=0, logprobs=0)
    generate = client.generates[0]
    assert generate.params.max_tokens == 1
    prompt_lp = (None, *(TokenLogprobs(t, -1.0, 1) for t in generate.prompt_token_ids[1:]))
    client.feed(tokens(generate.request_id, "X", prompt_logprobs=prompt_lp, finish_reason="length"))
    (choice,) = client.json()["choices"]
    assert choice["text"] == "Just this"
    assert choice["logprobs"]["tokens"] == ["<s>", *"Just this"]
    assert choice["logprobs"]["token_logprobs"][:2] == [None, -1.0]
    assert choice["logprobs"]["top_logprobs"][0] is None
    assert client.json()["usage"]["completion_tokens"] == 1  # the engine's one step counts, as in vLLM


def test_completion_logprobs_hold_the_sampled_token_plus_top_k():
    client = complete(prompt="q", logprobs=1, max_tokens=2)
    rid = client.generates[0].request_id
    assert client.generates[0].params.logprobs == 1
    client.feed(
        tokens(rid, "a", logprobs=(TokenLogprobs(97, -2.0, 3, ((98, -0.1),)),)),
        tokens(rid, "b", logprobs=(TokenLogprobs(98, -0.2, 1, ((98, -0.2),)),), finish_reason="length"),
    )
    logprobs = client.json()["choices"][0]["logprobs"]
    assert logprobs == {
        "text_offset": [0, 1],
        "token_logprobs": [-2.0, -0.2],
        "tokens": ["a", "b"],
        "top_logprobs": [{"a": -2.0, "b": -0.1}, {"b": -0.2}],
    }


def test_stream_logprobs_agree_with_the_full_response():
    entries = [TokenLogprobs(ord(c), -float(i), 1, ((ord(c), -float(i)),)) for i, c in enumerate("xyz")]
    results = []
    for stream in (False, True):
        client = complete(prompt="p", logprobs=1, stream=stream, max_tokens=3)
        rid = client.generates[0].request_id
        client.feed(
            *(
                tokens(rid, c, logprobs=(e,), finish_reason="length" if c == "z" else None)
                for c, e in zip("xyz", entries, strict=True)
            )
        )
        if stream:
            merged = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
            for event in client.events():
                for key in merged:
                    merged[key] += event["choices"][0]["logprobs"][key]
            results.append(merged)
        else:
            results.append(client.json()["choices"][0]["logprobs"])
    assert results[0] == results[1]


def test_return_tokens_as_token_ids():
    client = complete(prompt="q", logprobs=0, return_tokens_as_token_ids=True, max_tokens=1)
    rid = client.generates[0].request_id
    client.feed(tokens(rid, "a", logprobs=(TokenLogprobs(97, -1.0, 1),), finish_reason="length"))
    assert client.json()["choices"][0]["logprobs"]["tokens"] == ["token_id:97"]


def test_stop_string_with_include_stop_str():
    client = complete(prompt="q", stop=["END"], include_stop_str_in_output=True, n=2)
    rid = client.generates[0].request_id
    client.feed(*script(rid, "abcENDxyz", 0)[:-1], *script(rid, "no stop", 1))
    choices = client.json()["choices"]
    assert choices[0]["text"] == "abcEND" and choices[0]["stop_reason"] == "END"
    assert choices[1]["text"] == "no stop" and choices[1]["stop_reason"] is None
    assert client.aborts == [Abort(rid, 0)]


def test_failure_of_one_prompt_aborts_the_others():
    client = complete(prompt=["a", "b", "c"], stream=True)
    ids = [g.request_id for g in client.generates]
    client.feed(*script(ids[2], "done"))
    client.feed(Failed(ids[0], 400, "bad grammar"))
    assert client.status == 200  # the stream had started
    assert client.events()[-1]["error"]["message"] == "bad grammar"
    assert client.aborts == [Abort(ids[1])]


def test_failure_before_output_is_the_response_status():
    client = complete(prompt=["a", "b"])
    ids = [g.request_id for g in client.generates]
    client.feed(Failed(ids[1], 507, "no room"))
    assert client.status == 507 and client.json()["error"]["code"] == 507
    assert client.aborts == [Abort(ids[0])]


def test_disconnect_aborts_each_unfinished_prompt():
    client = complete(prompt=["a", "b"], stream=True)
    ids = [g.request_id for g in client.generates]
    client.feed(*script(ids[0], "x"))
    assert client.call.disconnected() == [Abort(ids[1])]


def test_request_errors():
    assert complete(prompt="a", suffix="z").status == 400
    assert complete(prompt="x" * 300).status == 400
    assert (
        complete(prompt="a", logprobs=21)
        .json()["error"]["message"]
        .startswith("Requested sample logprobs of 21")
    )
    missing = complete(prompt="a", model="nope")
    assert missing.status == 404 and missing.json()["error"]["message"] == "The model `nope` does not exist."


def test_cache_salt_reaches_every_engine_request():
    call = complete(prompt=["a", "b"], cache_salt="tenant-7")
    assert [g.cache_salt for g in call.generates] == ["tenant-7", "tenant-7"]
    assert complete(prompt="a").generate.cache_salt is None
