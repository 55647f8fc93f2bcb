"""best_of and beam search through the protocol core: the engine sends each returned choice once,
finished and whole; choices keep the documented indices, streams end with the choices, usage counts
the discarded best_of candidates."""

from protocol.engine_api import TokenLogprobs
from protocol.testing import EOS_ID
from tests.protocol.test_calls_chat import chat
from tests.protocol.test_calls_completion import complete, tokens


def whole(request_id, index, text, *, discarded=0, logprobs=None, cumulative=-1.0):
    """One engine event: a chosen candidate or beam, all of it, finished by EOS."""
    return tokens(
        request_id,
        (*text.encode(), EOS_ID),
        index,
        finish_reason="stop",
        num_discarded_tokens=discarded,
        logprobs=logprobs,
        cumulative_logprob=cumulative,
    )


def test_completion_best_of_returns_n_choices_and_usage_counts_every_candidate():
    client = complete(prompt="hi", n=2, best_of=3, max_tokens=5)
    generate = client.generate
    assert (generate.params.n, generate.params.best_of) == (2, 3)
    client.feed(whole(generate.request_id, 0, "abc", discarded=4), whole(generate.request_id, 1, "de"))
    body = client.json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "abc", "stop"),
        (1, "de", "stop"),
    ]
    assert body["usage"]["completion_tokens"] == 4 + 3 + 4  # both choices with their EOS, and the third


def test_completion_beam_search_stream_sends_each_choice_whole_then_usage_then_done():
    client = complete(
        prompt=["ab", "cd"],
        n=2,
        use_beam_search=True,
        temperature=0,
        length_penalty=0.5,
        early_stopping="never",
        stream=True,
        stream_options={"include_usage": True},
    )
    first, second = client.generates
    assert first.params.use_beam_search and first.params.early_stopping == "never"
    assert first.params.length_penalty == 0.5
    assert client.status is None  # nothing to say before the search ends
    client.feed(whole(second.request_id, 0, "zz"), whole(second.request_id, 1, "y"))
    client.feed(whole(first.request_id, 0, "xx"), whole(first.request_id, 1, "w"))
    events = client.events()
    choices = [
        (e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"])
        for e in events[:-1]
    ]
    assert sorted(choices) == [(0, "xx", "stop"), (1, "w", "stop"), (2, "zz", "stop"), (3, "y", "stop")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3 + 2 + 3 + 2


def test_chat_beam_search_stream_is_role_then_one_whole_chunk_per_choice():
    client = chat(n=2, use_beam_search=True, temperature=0, stream=True, logprobs=True)
    rid = client.generate.request_id
    assert client.generate.params.n == 2 and client.generate.params.use_beam_search
    logprobs = tuple(TokenLogprobs(t, -0.5, 1) for t in (*b"ok", EOS_ID))
    client.feed(whole(rid, 0, "ok", logprobs=logprobs), whole(rid, 1, "no", logprobs=logprobs))
    events = client.events()
    roles = [e for e in events if e["choices"][0]["delta"].get("role")]
    assert [e["choices"][0]["index"] for e in roles] == [0, 1]
    rest = [e["choices"][0] for e in events if not e["choices"][0]["delta"].get("role")]
    assert [(c["index"], c["delta"]["content"], c["finish_reason"]) for c in rest] == [
        (0, "ok", "stop"),
        (1, "no", "stop"),
    ]
    assert [t["token"] for t in rest[0]["logprobs"]["content"]] == ["o", "k", "</s>"]


def test_chat_best_of_non_stream():
    client = chat(n=1, best_of=4, temperature=0.7)
    rid = client.generate.request_id
    client.feed(whole(rid, 0, "fine", discarded=9))
    body = client.json()
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "fine")]
    assert body["usage"]["completion_tokens"] == 5 + 9


def test_bad_beam_and_best_of_fields_are_400s():
    bad = complete(prompt="hi", use_beam_search=True, early_stopping="sometimes")
    assert bad.status == 400 and "early_stopping" in bad.json()["error"]["message"]
    greedy = chat(best_of=2, temperature=0)
    assert greedy.status == 400 and greedy.json()["error"]["param"] == "best_of"
    assert chat(n=3, best_of=2).status == 400
    assert chat(n=2, temperature=0, use_beam_search=True).status is None  # a beam search may be greedy
