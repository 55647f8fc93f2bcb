"""/score and /rerank through the Sans-IO core: cosine scores of an embedding model, cross-encoder pairs."""

import math

import numpy
import pytest

from protocol import Abort, Failed, Pooled
from protocol.calls.score import cosine_similarity
from protocol.testing import BOS_ID, EOS_ID, ByteTokenizer, tiny_pooling_model
from tests.protocol.test_calls_pooling import NOW, error_of, ids, make_app, post

CROSS_ENCODER = ("classify", "score")


def cross_app(**kw):
    return make_app(tiny_pooling_model(CROSS_ENCODER, **kw))


def score(app=None, **body):
    return post("/score", app, **body)


def rerank(app=None, path="/rerank", **body):
    return post(path, app, **body)


def numpy_cosine(a, b):
    a, b = numpy.asarray(a), numpy.asarray(b)
    return float(a @ b / (numpy.linalg.norm(a) * numpy.linalg.norm(b)))


VECTORS = {"q": (1.0, 0.0, 0.0), "a": (1.0, 1.0, 0.0), "b": (0.0, 0.0, 2.0), "c": (-1.0, 0.5, 0.0)}


def answer_by_text(client):
    """Answer each Encode of an embedding model with the vector of its text."""
    events = []
    for encode in client.encodes:
        text = ByteTokenizer().decode(encode.prompt_token_ids)
        events.append(Pooled(encode.request_id, VECTORS[text], len(encode.prompt_token_ids)))
    return client.feed(*events)


# ---- embedding models: cosine similarity ----


def test_one_to_many_embeds_each_distinct_text_once_and_scores_by_cosine():
    client = score(text_1="q", text_2=["a", "b", "q"])
    assert [e.prompt_token_ids for e in client.encodes] == [ids("q"), ids("a"), ids("b")]
    assert [e.request_id for e in client.encodes] == ["score-r1-0", "score-r1-1", "score-r1-2"]
    assert all(e.params.task == "embed" and e.params.use_activation is None for e in client.encodes)
    body = answer_by_text(client).json()
    assert body["id"] == "score-r1" and body["object"] == "list" and body["created"] == int(NOW)
    assert body["model"] == "tiny-pooling-model"
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert all(item["object"] == "score" for item in body["data"])
    scores = [item["score"] for item in body["data"]]
    assert scores == pytest.approx([numpy_cosine(VECTORS["q"], VECTORS[t]) for t in "abq"])
    assert scores[2] == pytest.approx(1.0) and scores[1] == pytest.approx(0.0)
    # every text the engine saw, once: q, a, b (2 tokens each)
    assert body["usage"] == {
        "prompt_tokens": 6,
        "total_tokens": 6,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def test_n_to_n_and_one_to_one():
    body = answer_by_text(score(text_1=["a", "c"], text_2=["b", "a"])).json()
    assert [item["score"] for item in body["data"]] == pytest.approx(
        [numpy_cosine(VECTORS["a"], VECTORS["b"]), numpy_cosine(VECTORS["c"], VECTORS["a"])]
    )
    single = answer_by_text(score(text_1="a", text_2="c")).json()
    assert [item["score"] for item in single["data"]] == pytest.approx(
        [numpy_cosine(VECTORS["a"], VECTORS["c"])]
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [("queries", "documents"), ("queries", "items"), ("data_1", "data_2")],
)
def test_newer_field_names(first, second):
    client = score(**{first: "q", second: ["a", "b"]})
    assert len(answer_by_text(client).json()["data"]) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"text_1": "a"},
        {"text_2": ["a"]},
        {},
        {"text_1": "a", "text_2": "b", "queries": "c", "documents": ["d"]},
        {"text_1": "a", "text_2": "b", "data_1": "c"},
        {"queries": "a", "documents": ["b"], "items": ["c"]},
    ],
)
def test_exactly_one_pair_of_fields(body):
    assert "one pair only" in error_of(score(**body))["message"]


def test_pairing_must_be_one_to_one_one_to_many_or_n_to_n():
    error = error_of(score(text_1=["a", "b"], text_2=["a", "b", "c"]))
    assert error["message"] == "Input lengths must be either 1:1, 1:N or N:N" and error["param"] == "text_2"
    assert error_of(score(text_1=[], text_2=["a"]))["message"] == "At least one text element must be given"
    assert error_of(score(text_1="a", text_2=[]))["message"] == "At least one text_pair element must be given"
    assert error_of(score(queries=["a", "b"], documents=["c"]))["param"] == "documents"


def test_cosine_similarity_matches_torch_semantics():
    assert cosine_similarity([3.0, 4.0], [3.0, 4.0]) == pytest.approx(1.0)
    assert cosine_similarity([1.0, 0.0], [-1.0, 0.0]) == pytest.approx(-1.0)
    assert cosine_similarity([0.0, 0.0], [1.0, 0.0]) == 0.0  # eps, not a division by zero
    with pytest.raises(ValueError):
        cosine_similarity([1.0], [1.0, 2.0])


def test_use_activation_is_not_a_parameter_of_embeddings():
    error = error_of(score(text_1="a", text_2="b", use_activation=True))
    assert "Task embed only supports ['dimensions', 'normalize'] parameters" in error["message"]


def test_score_inputs_are_checked_against_the_context():
    app = make_app(tiny_pooling_model(max_model_len=3))
    error = error_of(score(app, text_1="ab", text_2="abc"))
    assert error["message"] == (
        "This model's maximum context length is 3 tokens. However, you requested 4 tokens in the input for "
        "score. Please reduce the length of the input."
    )
    assert error["param"] == "text_2"
    assert score(app, text_1="ab", text_2="abc", truncate_prompt_tokens=3).encodes[1].prompt_token_ids == (
        BOS_ID,
        *b"bc",
    )


def test_v1_score_is_score():
    client = post("/v1/score", text_1="q", text_2="a")
    assert client.encodes[0].request_id == "score-r1-0"
    assert answer_by_text(client).status == 200


# ---- cross-encoders: one pair per Encode ----


def test_cross_encoder_pairs_come_from_the_tokenizers_pair_encoding():
    client = score(cross_app(), text_1="ab", text_2=["c", "de"], use_activation=False)
    first, second = client.encodes
    assert first.prompt_token_ids == (BOS_ID, *b"ab", EOS_ID, *b"c", EOS_ID)
    assert first.token_type_ids == (0, 0, 0, 0, 1, 1)
    assert second.prompt_token_ids == (BOS_ID, *b"ab", EOS_ID, *b"de", EOS_ID)
    assert second.token_type_ids == (0, 0, 0, 0, 1, 1, 1)
    assert first.params.task == "score" and first.params.use_activation is False
    client.feed(Pooled(second.request_id, (0.25,), 7), Pooled(first.request_id, (0.75,), 6))
    body = client.json()
    assert [(item["index"], item["score"]) for item in body["data"]] == [(0, 0.75), (1, 0.25)]
    assert body["usage"]["prompt_tokens"] == 13


def test_cross_encoder_n_to_n_and_truncation():
    client = score(
        cross_app(max_model_len=8), text_1=["abcdef", "x"], text_2=["g", "y"], truncate_prompt_tokens=6
    )
    long_pair = client.encodes[0]
    assert long_pair.prompt_token_ids == (BOS_ID, *b"ab", EOS_ID, *b"g", EOS_ID)  # the longer text was cut
    assert len(long_pair.token_type_ids) == 6
    error = error_of(score(cross_app(max_model_len=8), text_1="abcdef", text_2="g"))
    assert "you requested 10 tokens in the input for score." in error["message"]


def test_cross_encoder_bad_output_is_a_500():
    client = score(cross_app(), text_1="a", text_2="b")
    client.feed(Pooled(client.encodes[0].request_id, (), 3))
    assert client.status == 500


# ---- rerank ----

DOCS = ["a", "b", "c"]


def test_rerank_jina_shape_sorted_with_documents():
    client = rerank(query="q", documents=DOCS)
    assert [e.request_id for e in client.encodes] == [
        "rerank-r1-0",
        "rerank-r1-1",
        "rerank-r1-2",
        "rerank-r1-3",
    ]
    body = answer_by_text(client).json()
    expected = {t: numpy_cosine(VECTORS["q"], VECTORS[t]) for t in DOCS}
    assert set(body) == {"id", "model", "usage", "results", "meta"}
    assert body["id"] == "rerank-r1" and body["model"] == "tiny-pooling-model"
    assert [r["index"] for r in body["results"]] == [0, 1, 2]  # a (0.71) > b (0) > c (-0.89)
    assert [r["document"] for r in body["results"]] == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([expected[t] for t in DOCS])
    assert body["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    assert body["meta"] == {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}


def test_rerank_sorts_descending_and_keeps_the_original_index():
    client = rerank(cross_app(), query="q", documents=["low", "high", "mid", "tie-high"], top_n=3)
    assert [e.prompt_token_ids[-4:] for e in client.encodes][1] == (*b"igh", EOS_ID)
    scores = (0.1, 0.9, 0.5, 0.9)
    client.feed(*[Pooled(e.request_id, (s,), 4) for e, s in zip(client.encodes, scores, strict=True)])
    results = client.json()["results"]
    assert [(r["index"], r["relevance_score"], r["document"]["text"]) for r in results] == [
        (1, 0.9, "high"),
        (3, 0.9, "tie-high"),  # ties keep the request's order
        (2, 0.5, "mid"),
    ]
    assert client.json()["usage"] == {"prompt_tokens": 16, "total_tokens": 16}


@pytest.mark.parametrize(("top_n", "count"), [(None, 3), (0, 3), (1, 1), (2, 2), (3, 3), (10, 3)])
def test_rerank_top_n(top_n, count):
    body = {"query": "q", "documents": DOCS} | ({} if top_n is None else {"top_n": top_n})
    assert len(answer_by_text(rerank(**body)).json()["results"]) == count


def test_rerank_negative_top_n_is_400():
    error = error_of(rerank(query="q", documents=DOCS, top_n=-1))
    assert "greater_than_equal" in error["message"] and error["param"] == "top_n"


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_cohere_shape(path):
    client = rerank(
        path=path,
        model="tiny-pooling-model",
        query="q",
        documents=[{"text": "c"}, "a", {"text": "b", "title": "ignored"}],
        top_n=2,
        return_documents=False,
        max_tokens_per_doc=512,
        max_chunks_per_doc=10,
        rank_fields=["text"],
    )
    body = answer_by_text(client).json()
    assert body["results"] == [
        {"index": 1, "relevance_score": pytest.approx(numpy_cosine(VECTORS["q"], VECTORS["a"]))},
        {"index": 2, "relevance_score": pytest.approx(0.0)},
    ]
    assert body["meta"]["api_version"]["version"] == "2" and body["meta"]["billed_units"]["search_units"] == 1


def test_rerank_document_objects_need_text():
    assert error_of(rerank(query="q", documents=[{"title": "no text"}]))["code"] == 400
    assert (
        error_of(rerank(query="q", documents=[]))["message"] == "At least one text_pair element must be given"
    )
    assert "missing" in error_of(rerank(documents=["a"]))["message"]


def test_rerank_on_a_cross_encoder_pairs_the_query_with_each_document():
    client = rerank(cross_app(), query="q", documents=["a", "b"], use_activation=True)
    assert [e.prompt_token_ids for e in client.encodes] == [
        (BOS_ID, *b"q", EOS_ID, *b"a", EOS_ID),
        (BOS_ID, *b"q", EOS_ID, *b"b", EOS_ID),
    ]
    assert all(e.params.use_activation is True and e.params.task == "score" for e in client.encodes)


def test_rerank_length_error_says_embedding_generation():
    error = error_of(rerank(make_app(tiny_pooling_model(max_model_len=3)), query="q", documents=["abc"]))
    assert "for embedding generation." in error["message"] and error["param"] == "documents"


def test_rerank_request_ids_follow_the_header():
    client = post(
        "/rerank",
        None,
        [(b"content-type", b"application/json"), (b"x-request-id", b"t1")],
        query="q",
        documents=["a"],
    )
    assert all(e.request_id.startswith("rerank-t1-") for e in client.encodes)
    assert answer_by_text(client).json()["id"] == "rerank-t1"


# ---- failures and disconnects ----


def test_score_failure_keeps_its_status_and_aborts_the_rest():
    client = score(cross_app(), text_1="a", text_2=["b", "c", "d"])
    first, second, third = client.encodes
    client.feed(Failed(first.request_id, 400, "bad input for the engine"))
    assert client.status == 400 and client.json()["error"]["message"] == "bad input for the engine"
    assert client.aborts == [Abort(second.request_id), Abort(third.request_id)]


def test_rerank_disconnect_aborts_what_is_running():
    client = rerank(query="q", documents=["a", "b"])
    q, a, b = client.encodes
    client.feed(Pooled(a.request_id, VECTORS["a"], 2))
    assert client.call.disconnected() == [Abort(q.request_id), Abort(b.request_id)]
    assert client.status is None and client.call.finished


def test_nan_free_scores_for_zero_vectors():
    client = score(text_1="q", text_2="a")
    client.feed(*[Pooled(e.request_id, (0.0, 0.0), 2) for e in client.encodes])
    assert client.json()["data"][0]["score"] == 0.0 and not math.isnan(client.json()["data"][0]["score"])
