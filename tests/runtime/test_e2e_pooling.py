"""End to end: embeddings, score and rerank over sockets, under both runtimes, with real and tiny models.

One server per runtime serves three models from one process, as `sansllm serve` does: the packaged
all-MiniLM-L6-v2 (embeddings; score and rerank by cosine similarity), a tiny random cross-encoder
(`BertForSequenceClassification`, one label) and a tiny random Llama (a generative model, to show
what the pooling routes refuse).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from engine import resolve_model
from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app, load_engines
from tests.engine.tiny_encoders import build_encoder_folder
from tests.engine.tiny_models import build_model
from tests.runtime.server import BRIDGES, RUNTIMES, ServerThread

pytestmark = pytest.mark.e2e

EMBEDDER = "all-MiniLM-L6-v2"
WORDS = (
    "the a man woman child dog cat horse eats rides reads writes quickly slowly under over near far "
    "bread food car train city river mountain book letter song happy sad old new red green"
).split()


def sentences(count: int) -> list[str]:
    """Deterministic sentences of mixed length (2 to ~60 words)."""
    out = []
    for i in range(count):
        length = 2 + (i * 37) % 59
        out.append(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)).capitalize() + ".")
    return out


# (query, the relevant document): each query's document must rank first among all documents
RERANK_TABLE = [
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("How do plants make food?", "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet is a tragedy written by William Shakespeare."),
    ("How fast does light travel?", "Light moves through a vacuum at about 300,000 kilometres per second."),
    ("What do pandas eat?", "Giant pandas feed almost entirely on bamboo shoots and leaves."),
    ("How do I boil an egg?", "Place the egg in boiling water and cook it for about eight minutes."),
    ("When did humans land on the Moon?", "Apollo 11 landed the first astronauts on the Moon in July 1969."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest and deepest of Earth's oceans."),
    ("How many legs does a spider have?", "Spiders are arachnids with eight legs and two body segments."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
    ("What currency does Japan use?", "The yen is the official currency of Japan."),
    ("How do vaccines work?", "Vaccines train the immune system to recognise a germ before an infection."),
]
DOCUMENTS = [document for _, document in RERANK_TABLE]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pooling-models")
    return {
        "cross": build_encoder_folder(root / "tiny-cross-encoder", "BertForSequenceClassification", num_labels=1),
        "llama": build_model(root / "tiny-llama", "llama"),
    }


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, folders):
    specs = [EMBEDDER, "--model", json.dumps({"model": str(folders["cross"]), "served_model_name": "cross"})]
    specs += ["--model", json.dumps({"model": str(folders["llama"]), "served_model_name": "llama"})]
    args = parse_serve_args(specs, environ={})
    engines = load_engines(args)
    with ServerThread(build_asgi_app(args, engines, BRIDGES[request.param]), request.param) as running:
        yield running.url


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' recipe by hand: attention-mask-weighted mean, then L2 normalisation."""
    folder = resolve_model(EMBEDDER).path
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    return embed


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def cosine_distances(got: list[list[float]], expected: torch.Tensor) -> torch.Tensor:
    got_t = torch.nn.functional.normalize(torch.tensor(got, dtype=torch.float64), dim=-1)
    return 1 - (got_t * expected.double()).sum(-1)


def test_openai_client_embeddings_match_the_reference_alone_and_in_concurrent_batches(server, reference):
    texts = sentences(50)
    expected = reference(texts)
    api = client(server)
    alone = [api.embeddings.create(model=EMBEDDER, input=text).data[0].embedding for text in texts[:10]]
    assert cosine_distances(alone, expected[:10]).max() < 1e-5

    batches = [texts[i : i + 7] for i in range(0, len(texts), 7)]  # mixed lengths in every request
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda batch: api.embeddings.create(model=EMBEDDER, input=batch), batches))
    got = [item.embedding for response in responses for item in response.data]
    assert cosine_distances(got, expected).max() < 1e-5
    assert all([item.index for item in r.data] == list(range(len(r.data))) for r in responses)
    # usage is exact: the tokens the model saw (the tokenizer's count with its special tokens)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(EMBEDDER).path)
    assert responses[0].usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in batches[0])
    assert responses[0].usage.total_tokens == responses[0].usage.prompt_tokens


def test_float_encoding_and_the_classic_similarity_check(server):
    data = post(server, "/v1/embeddings", {
        "model": EMBEDDER,
        "input": ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."],
        "encoding_format": "float",
    }).json()["data"]
    food, bread, horse = (torch.tensor(item["embedding"]) for item in data)
    assert food @ bread > food @ horse
    assert abs(food.norm().item() - 1) < 1e-5


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_over_the_embedding_model_puts_the_relevant_document_first(server, path):
    for query, relevant in RERANK_TABLE:  # Jina's shape: plain strings, documents echoed back
        body = post(server, path, {"model": EMBEDDER, "query": query, "documents": DOCUMENTS, "top_n": 3}).json()
        assert len(body["results"]) == 3
        assert body["results"][0]["document"]["text"] == relevant
        assert body["results"][0]["index"] == DOCUMENTS.index(relevant)
        scores = [r["relevance_score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
    query, relevant = RERANK_TABLE[0]  # Cohere's shape: documents as objects, no documents back
    cohere = post(server, path, {
        "model": EMBEDDER,
        "query": query,
        "documents": [{"text": d} for d in DOCUMENTS],
        "return_documents": False,
        "max_tokens_per_doc": 4096,
    }).json()
    assert len(cohere["results"]) == len(DOCUMENTS) and "document" not in cohere["results"][0]
    assert cohere["results"][0]["index"] == DOCUMENTS.index(relevant)
    assert cohere["meta"]["billed_units"]["search_units"] == 1 and cohere["id"].startswith("rerank-")


def test_score_over_the_embedding_model_is_cosine_similarity(server, reference):
    first, others = "A man is eating food.", ["A man is eating a piece of bread.", "A man is riding a horse."]
    body = post(server, "/score", {"model": EMBEDDER, "text_1": first, "text_2": others}).json()
    vectors = reference([first, *others])
    expected = [(vectors[0] @ vectors[i]).item() for i in (1, 2)]
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-5)
    pairs = post(server, "/v1/score", {"model": EMBEDDER, "text_1": others, "text_2": others}).json()
    assert [d["score"] for d in pairs["data"]] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_a_cross_encoder_scores_like_its_hf_reference_through_score_and_rerank(server, folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["cross"])
    model = AutoModelForSequenceClassification.from_pretrained(folders["cross"], attn_implementation="eager").eval()
    query = "a man is eating food"
    documents = ["a man is eating bread", "the capital of france is paris", "quick brown foxes jump"]
    with torch.no_grad():
        batch = tokenizer([query] * len(documents), documents, padding=True, return_tensors="pt")
        expected = torch.sigmoid(model(**batch).logits[:, 0]).tolist()
    scored = post(server, "/score", {"model": "cross", "text_1": query, "text_2": documents}).json()
    assert [d["score"] for d in scored["data"]] == pytest.approx(expected, abs=1e-5)
    ranked = post(server, "/rerank", {"model": "cross", "query": query, "documents": documents}).json()
    order = sorted(range(len(documents)), key=lambda i: -expected[i])
    assert [r["index"] for r in ranked["results"]] == order
    assert [r["relevance_score"] for r in ranked["results"]] == pytest.approx([expected[i] for i in order], abs=1e-5)


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "encoding_format": "hex"}, "literal_error"),
        ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "dimensions": 64}, "does not support matryoshka"),
        ("/v1/embeddings", {"model": EMBEDDER, "input": "word " * 400}, "maximum context length is 256"),
        ("/score", {"model": EMBEDDER, "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "1:1, 1:N or N:N"),
        ("/v1/chat/completions", {"model": EMBEDDER, "messages": [{"role": "user", "content": "hi"}]},
         "does not support Chat Completions API"),
        ("/v1/embeddings", {"model": "llama", "input": "x"}, "does not support Embeddings API"),
        ("/rerank", {"model": "llama", "query": "x", "documents": ["y"]}, "does not support Rerank API"),
    ],
)
def test_bad_requests_are_openai_shaped_400s(server, path, body, needle):
    response = post(server, path, body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == 400 and needle in error["message"], error


def test_the_models_list_shows_every_model(server):
    ids = [model.id for model in client(server).models.list().data]
    assert ids == [EMBEDDER, "cross", "llama"]
