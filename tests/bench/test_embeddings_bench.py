"""The embeddings benchmark runs end to end on a tiny random sentence-transformers BERT (no timing asserted).

What is asserted is what a reader of its table relies on: the sentences are the same for the same
seed and of the asked lengths, every sentence comes back through `/v1/embeddings` in order and
matches sentence-transformers' `encode`, the ratios are printed and `--record` writes the command.
The serving benchmark's `--variant-server-args` (the same prompts against a server with an idle
embedding model beside) is run here too, on a tiny Llama and the tiny BERT.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from bench import embeddings, py_spy, serving
from bench.embeddings import make_sentences, max_cosine_distance, sentence_words
from tests.bench.test_bench_smoke import tiny_model  # noqa: F401, F811 (a fixture: the tiny Llama)


@pytest.fixture(scope="module")
def tiny_st_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random BERT as a sentence-transformers folder (mean pooling, then Normalize), with a
    WordPiece tokenizer trained on the benchmark's own words (so sentences stay short in tokens)."""
    folder = tmp_path_factory.mktemp("tiny-st-bert")
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece.train_from_iterator(
        [" ".join(sentence_words())], trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    )
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    model = BertModel(config, add_pooling_layer=False)
    with torch.no_grad():  # the default init zeroes biases and sets norms to one: randomise everything
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 256, "do_lower_case": False})
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (folder / "2_Normalize").mkdir()
    return str(folder)


def test_sentences_are_deterministic_distinct_and_of_mixed_length() -> None:
    first = make_sentences(300, seed=3)
    assert first == make_sentences(300, seed=3) and first != make_sentences(300, seed=4)
    assert len(set(first)) == 300
    words = [len(s.split()) for s in first]
    assert min(words) >= 4 and max(words) <= 120
    assert sum(w <= 16 for w in words) > 60 and sum(w > 60 for w in words) > 20  # queries and long passages
    assert all(s[0].isupper() and s.endswith((".", "?", "!")) for s in first)


def test_cosine_distance_and_argument_lists() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    assert max_cosine_distance(a, a * 3) == pytest.approx(0.0, abs=1e-12)
    assert max_cosine_distance(a, np.array([[0.0, 1.0], [0.0, 1.0]], dtype=np.float32)) == pytest.approx(1.0)
    assert embeddings.parse_counts("1,32") == [1, 32]
    with pytest.raises(ValueError):
        embeddings.parse_counts("0")


def test_profile_buckets_from_collapsed_stacks(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    engine = "thread (0x1): sansllm-engine;_TorchThread._run (engine/engine.py:348);EngineThread._loop (engine/engine.py:120);EncoderCore.step (engine/encoder_core.py:95)"
    loop = "thread (0x2): MainThread;BaseEventLoop.run_forever (asyncio/base_events.py:607);AsgiApp.__call__ (protocol/asgi.py:96)"
    raw.write_text(
        f"{engine};BertModel.forward (engine/models/bert.py:1);linear (kernels/torch_ops/linear.py:20) 30\n"
        f"{engine};BertModel.forward (engine/models/bert.py:1);layer_norm (torch/nn/functional.py:2987) 10\n"
        f"{loop};App.handle (protocol/app.py:1);HFTokenizer.encode (engine/tokenizer.py:112) 4\n"
        f"{loop};_Exchange._play (protocol/asgi.py:250);H11Protocol.stream_send (hypercorn/protocol/h11.py:1) 6\n"
    )
    parts = py_spy.summarize(raw, rate=10)
    assert parts == {
        "engine: projections (linear)": 3.0,
        "engine: LayerNorm": 1.0,
        "loop: HTTP and asyncio (hypercorn, h11, sockets, scheduling)": 0.6,
        "loop: tokenization": 0.4,
    }


@pytest.fixture(scope="module")
def embeddings_run(tiny_st_model: str, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("embeddings")
    argv = ["--model", tiny_st_model, "--num-sentences", "24", "--concurrency", "3", "--inputs-per-request",
            "1,5", "--repeats", "2", "--record", "--results", str(out / "RESULTS.md"), "--note", "smoke test"]  # fmt: skip
    if shutil.which("py-spy") or Path(embeddings.sys.executable).with_name("py-spy").is_file():
        argv += ["--profile", str(out / "profiles"), "--profile-rate", "50"]
    result, text = embeddings.run_and_report(argv)
    return result, text, out


def test_embeddings_benchmark_matches_sentence_transformers_and_records(embeddings_run) -> None:
    result, text, out = embeddings_run
    assert result.sentences == 24 and len(result.baseline) == 4 and result.baseline_before == 2
    assert [[(p.inputs_per_request, len(p.latencies)) for p in passes] for passes in result.runs] == [
        [(1, 24), (1, 24)],
        [(5, 5), (5, 5)],
    ]
    for passes in result.runs:
        for pass_ in passes:
            assert pass_.vectors.shape == (24, 32)  # every sentence, in order (the distance checks the order)
            assert pass_.elapsed > 0 and pass_.server_cpu_s >= 0  # /proc counts 10 ms ticks
        assert result.speedup(passes, "best") > 0 and result.speedup(passes, "median") > 0
    assert max(result.distances) < 1e-5
    assert result.batch_size == 32 and result.threads == torch.get_num_threads()
    assert "embeddings/s, sansllm (5 per request, 3 clients) / sentence-transformers: x" in text
    assert "CPU: " in text and "flags: " in text
    recorded = (out / "RESULTS.md").read_text()
    assert "## Embeddings" in recorded and "Note: smoke test" in recorded
    assert "-m bench.embeddings --model" in recorded and "--inputs-per-request 1,5" in recorded
    assert text in recorded
    if (out / "profiles").is_dir():  # py-spy installed: a profile of the first pass of each
        assert [[p.profile is not None for p in passes] for passes in result.runs] == [[True, False]] * 2
        assert "Server profile, 1 per request" in text and "Server profile, 5 per request" in text


def test_embeddings_client_sends_the_asked_number_per_request(embeddings_run, tiny_st_model: str) -> None:
    """Against a running server: 7 sentences, 3 per request -> requests of 3, 3 and 1, answers in order."""
    from bench.server_process import ServerProcess

    sentences = make_sentences(7, seed=5)
    with ServerProcess(tiny_st_model, ["--dtype", "float32"]) as server:
        run = asyncio.run(embeddings.embed_all(server.base_url, tiny_st_model, sentences, 2, 3, "base64"))
        single = asyncio.run(embeddings.embed_all(server.base_url, tiny_st_model, sentences[2:3], 1, 1))
    assert len(run.latencies) == 3 and run.vectors.shape == (7, 32)
    assert max_cosine_distance(single.vectors, run.vectors[2:3]) < 1e-6


def test_serving_benchmark_runs_again_with_an_idle_model_beside(tiny_model: str, tiny_st_model: str) -> None:  # noqa: F811
    variant = f"--model {tiny_st_model}"
    argv = ["--model", tiny_model, "--concurrency", "2", "--num-prompts", "2", "--input-len", "8,16",
            "--output-len", "3,4", "--no-hf", "--variant-server-args", variant]  # fmt: skip
    result, text = serving.run_and_report(argv)
    names = [s.name for s in result.summaries]
    assert names == [serving.OURS, serving.variant_name(serving.OURS, variant)]
    assert result.summaries[0].output_tokens == result.summaries[1].output_tokens >= 2 * 3  # all asked for
    assert f"output tok/s, sansllm, with {variant} / sansllm: " in text
