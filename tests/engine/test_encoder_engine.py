"""Encoder models served by the engine: `Encode` in, one `Pooled` out, batched by the token budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from engine.engine import Engine, EngineConfig
from engine.model_files import resolve_model
from engine.offline import LLM, GenerationFailed
from protocol.engine_api import Abort, Encode, Failed, Generate, Pooled, PoolingParams, SamplingParams
from tests.engine.tiny_encoders import build_encoder_folder

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The new movie is awesome, and the cinema was full of people who laughed at every single joke.",
    "Paris",
    "Two dogs play in the snow while their owner watches from a bench near the frozen lake.",
]


@pytest.fixture(scope="module")
def minilm() -> Engine:
    return Engine(EngineConfig(model="all-MiniLM-L6-v2", progress=False, max_num_batched_tokens=40))


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("encoders") / "tiny-cross-encoder"
    return build_encoder_folder(folder, "BertForSequenceClassification", num_labels=1)


def reference_embeddings(sentences: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe by hand: attention-mask-weighted mean, then L2 normalisation."""
    folder = resolve_model("all-MiniLM-L6-v2").path
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_an_embedding_model_serves_embed_in_float32_with_its_sentence_transformers_limits(minilm):
    assert minilm.tasks == {"embed", "token_embed"}
    assert minilm.pooling.method == "mean" and minilm.pooling.normalize and minilm.pooling.hidden_size == 384
    assert minilm.max_model_len == 256  # sentence_bert_config.json's max_seq_length, under the model's 512
    assert minilm.core.runner.model.embeddings.word_embeddings.weight.dtype == torch.float32


def test_embeddings_match_the_reference_across_budget_sized_batches(minilm):
    ids = [minilm.tokenizer.encode(s) for s in SENTENCES]
    commands = [Encode(f"s{i}", tuple(p), PoolingParams()) for i, p in enumerate(ids)]
    first_step = minilm.step_sync(commands)
    rest = minilm.generate_sync([])
    assert 1 <= len(first_step) < len(SENTENCES)  # the 40-token budget split the inputs over steps
    pooled = {e.request_id: e for e in first_step + rest}
    got = torch.tensor([pooled[f"s{i}"].data for i in range(len(SENTENCES))])
    distance = 1 - (got * reference_embeddings(SENTENCES)).sum(-1)
    assert distance.max() < 1e-5
    assert [pooled[f"s{i}"].num_prompt_tokens for i in range(len(SENTENCES))] == [len(p) for p in ids]
    food, bread, horse = got[:3]
    assert food @ bread > food @ horse


def test_requests_choose_normalisation_and_dimensions(minilm):
    prompt = tuple(minilm.tokenizer.encode(SENTENCES[0]))
    events = minilm.generate_sync(
        [
            Encode("raw", prompt, PoolingParams(normalize=False)),
            Encode("unit", prompt, PoolingParams()),
            Encode("tokens", prompt, PoolingParams(task="token_embed")),
        ]
    )
    pooled = {e.request_id: e.data for e in events}
    raw, unit = torch.tensor(pooled["raw"]), torch.tensor(pooled["unit"])
    assert abs(raw.norm() - 1) > 1e-2 and abs(unit.norm() - 1) < 1e-5
    torch.testing.assert_close(raw / raw.norm(), unit, atol=1e-6, rtol=1e-5)
    assert len(pooled["tokens"]) == len(prompt) and len(pooled["tokens"][0]) == 384


def test_refusals_aborts_and_priority(minilm):
    prompt = tuple(minilm.tokenizer.encode(SENTENCES[3]))
    events = minilm.generate_sync(
        [
            Generate("g", prompt, SamplingParams()),
            Encode("c", prompt, PoolingParams(task="classify")),
            Encode("long", prompt * 20, PoolingParams()),
            Encode("oov", (10**7,), PoolingParams()),
            Encode("empty", (), PoolingParams()),
            Encode("wide", prompt, PoolingParams(dimensions=1000)),
        ]
    )
    failed = {e.request_id: e for e in events}
    assert all(isinstance(e, Failed) and e.status == 400 for e in failed.values()), failed
    assert "does not generate" in failed["g"].message and "'classify'" in failed["c"].message
    assert "maximum context length is 256" in failed["long"].message
    assert not minilm.core.has_work
    # an aborted input never runs; a better priority runs first
    first = minilm.step_sync(
        [
            Encode("late", prompt, PoolingParams(), priority=1),
            Encode("gone", prompt, PoolingParams()),
            Encode("urgent", prompt, PoolingParams(), priority=-1),
            Abort("gone"),
        ]
    )
    assert [e.request_id for e in first] == ["urgent"]
    assert [e.request_id for e in minilm.generate_sync([])] == ["late"]


def test_a_cross_encoder_scores_pairs_like_its_hf_reference(cross_encoder):
    engine = Engine(EngineConfig(model=str(cross_encoder), progress=False))
    assert engine.tasks == {"classify", "score"} and engine.pooling.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(cross_encoder)
    reference = AutoModelForSequenceClassification.from_pretrained(cross_encoder, attn_implementation="eager")
    pairs = [("a man is eating food", "a man is eating bread"), ("paris", "the capital of france is paris")]
    commands = []
    for i, (query, document) in enumerate(pairs):
        encoded = tokenizer(query, document)
        ids, types = tuple(encoded["input_ids"]), tuple(encoded["token_type_ids"])
        commands += [
            Encode(f"score{i}", ids, PoolingParams(task="score"), token_type_ids=types),
            Encode(f"logit{i}", ids, PoolingParams(task="classify", use_activation=False), token_type_ids=types),
        ]
    pooled = {e.request_id: e.data for e in engine.generate_sync(commands) if isinstance(e, Pooled)}
    with torch.no_grad():
        logits = reference(**tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt")).logits
    for i in range(len(pairs)):
        assert pooled[f"logit{i}"][0] == pytest.approx(logits[i, 0].item(), abs=1e-5)
        assert pooled[f"score{i}"][0] == pytest.approx(torch.sigmoid(logits[i, 0]).item(), abs=1e-6)


def test_offline_embed_returns_one_vector_per_input_in_order(minilm):
    llm = LLM(engine=minilm)
    vectors = llm.embed([SENTENCES[0], minilm.tokenizer.encode(SENTENCES[2])])
    expected = reference_embeddings([SENTENCES[0], SENTENCES[2]])
    assert (1 - (torch.tensor(vectors) * expected).sum(-1)).max() < 1e-5
    assert len(llm.embed([SENTENCES[1]], PoolingParams(dimensions=None, normalize=False))[0]) == 384
    with pytest.raises(GenerationFailed, match="maximum context length"):
        llm.embed(["word " * 400])


def test_an_encoder_queue_past_its_limits_refuses_with_503s(cross_encoder):
    engine = Engine(EngineConfig(model=str(cross_encoder), progress=False, max_num_queued_requests=2))
    events = engine.core.add([Encode(f"e{i}", (5, 6, 7), PoolingParams(task="classify")) for i in range(3)])
    assert [(e.request_id, e.status) for e in events] == [("e2", 503)]
    assert "--max-num-queued-requests 2" in events[0].message
    engine.core.add([Abort("e0")])  # an aborted input no longer counts
    assert engine.core.add([Encode("e3", (5, 6, 7), PoolingParams(task="classify"))]) == []
    by_tokens = Engine(EngineConfig(model=str(cross_encoder), progress=False, max_num_queued_tokens=5))
    (refused,) = by_tokens.core.add([Encode(f"t{i}", (5, 6, 7), PoolingParams(task="classify")) for i in range(2)])
    assert refused.request_id == "t1" and "3 prompt tokens are waiting" in refused.message
