"""The benchmark harness runs end to end on a tiny random Llama (no timing is asserted: numbers vary).

What is asserted is what a reader of the tables relies on: both backends generate exactly the
requested tokens for the same prompts, the ratios are printed, the cache run reports cached
tokens, and `--record` writes the command that reproduces the run.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench import serving, throughput
from bench.hf_baseline import HFTokenizer
from bench.prompts import CORPUS, SYSTEM_TEXT, make_prompts, shared_system_prompt, with_prefix
from bench.stats import RequestTiming, percentile, summarize


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random Llama with a 400-token byte-level BPE trained on the benchmark's own text."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([CORPUS, SYSTEM_TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return str(folder)


def _encode_words(text: str) -> list[int]:
    return list(range(len(text.split())))


def test_prompts_are_deterministic_and_within_the_asked_lengths() -> None:
    first = make_prompts(_encode_words, 5, input_len=(10, 20), output_len=(3, 7), seed=4)
    assert first == make_prompts(_encode_words, 5, input_len=(10, 20), output_len=(3, 7), seed=4)
    assert len({p.text for p in first}) == 5
    assert all(10 <= len(p.token_ids) <= 21 and 3 <= p.output_len <= 7 for p in first)
    prefix = shared_system_prompt(_encode_words, 50)
    assert 50 <= len(prefix.split()) <= 51
    salted = shared_system_prompt(_encode_words, 50, salt="Visitor 1.")
    assert salted.split()[:2] == ["Visitor", "1."] and salted.split()[2:] == prefix.split()[:-2]
    behind = with_prefix(_encode_words, first[0], prefix)
    assert behind.text.startswith(prefix) and behind.output_len == first[0].output_len


def test_summary_numbers_follow_their_definitions() -> None:
    timings = [
        RequestTiming(start=0.0, chunk_times=[0.5, 1.0, 1.5], output_tokens=3),
        RequestTiming(start=1.0, chunk_times=[2.0, 2.5, 3.0, 3.5, 4.0], output_tokens=6),
    ]
    summary = summarize("x", timings)
    assert summary.elapsed == 4.0 and summary.output_tokens == 9 and summary.output_tok_s == 9 / 4
    assert summary.ttft_p50 == pytest.approx(0.75)  # TTFTs 0.5 and 1.0
    assert summary.tpot_mean == pytest.approx((0.5 + 0.4) / 2)  # 1.0/2 and 2.0/5
    assert summary.itl_p50 == 0.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert summarize("x", timings, useful_tokens=4).output_tok_s == 1.0


def test_throughput_benchmark_runs_both_backends_and_records(tiny_model: str, tmp_path) -> None:
    results_file = tmp_path / "RESULTS.md"
    argv = ["--model", tiny_model, "--batch", "1,3", "--output-len", "5", "--input-len", "8,24",
            "--record", "--results", str(results_file), "--note", "smoke test"]  # fmt: skip
    results, text = throughput.run_and_report(argv)
    assert [r.batch for r in results] == [1, 3]
    for result in results:
        assert set(result.summaries) == {throughput.HF, throughput.OURS}
        for summary in result.summaries.values():
            assert summary.requests == result.batch
            assert summary.output_tokens == 5 * result.batch  # ignore_eos / min_new_tokens: all of them
            assert summary.output_tok_s > 0
        assert result.throughput_ratio > 0
    assert "ratio sansllm/hf-transformers at batch 3: output tok/s x" in text
    recorded = results_file.read_text()
    assert "## Offline throughput" in recorded and "Note: smoke test" in recorded
    assert f"-m bench.throughput --model {tiny_model} --batch 1,3" in recorded
    assert text in recorded


@pytest.fixture(scope="module")
def serving_run(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    """One shared-prefix serving benchmark against `sansllm serve` on the tiny model."""
    results_file = tmp_path_factory.mktemp("serving") / "RESULTS.md"
    argv = ["--model", tiny_model, "--concurrency", "2", "--num-prompts", "3", "--input-len", "8,24",
            "--output-len", "3,6", "--shared-prefix", "--prefix-len", "100", "--hf-ttft-samples", "1",
            "--record", "--results", str(results_file)]  # fmt: skip
    result, text = serving.run_and_report(argv)
    return result, text, results_file


def test_serving_benchmark_streams_every_token_and_reports_ratios(tiny_model: str, serving_run) -> None:
    result, text, results_file = serving_run
    assert [s.name for s in result.summaries] == [serving.HF, serving.OURS_COLD, serving.OURS_WARM]
    bodies = make_prompts(HFTokenizer(tiny_model).encode, 3, input_len=(8, 24), output_len=(3, 6), seed=0)
    requested = sum(p.output_len for p in bodies)
    assert all(s.output_tokens == requested and s.requests == 3 for s in result.summaries)
    assert result.hf_single_ttft and result.hf_single_ttft > 0
    assert "output tok/s, sansllm, prefix cached / HF static batch of 2: x" in text
    assert "TTFT p50 prefix cached / not cached" in text
    assert text in results_file.read_text()


def test_serving_benchmark_shared_prefix_is_served_from_the_cache(serving_run) -> None:
    result, _, _ = serving_run
    assert result.get(serving.OURS_COLD).cached_tokens == 0  # salted copies share nothing
    # After one request warmed it, every request finds the 100-token prefix (whole KV blocks of it).
    assert result.warm_cached_tokens and min(result.warm_cached_tokens) > 0


def test_serving_benchmark_runs_request_variants_against_the_same_server(tiny_model: str) -> None:
    """The sampling-cost run: plain sampling, then penalties + top_p + logprobs, each a row with a ratio."""
    sampled = '{"temperature": 1.0, "seed": 1}'
    costly = '{"top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.5, "logprobs": 5}'
    argv = ["--model", tiny_model, "--no-hf", "--concurrency", "2", "--num-prompts", "3", "--input-len", "8,16",
            "--output-len", "3,5", "--request-args", sampled, "--variant-request-args", costly,
            "--rounds", "2"]  # fmt: skip
    result, text = serving.run_and_report(argv)
    variant = serving.request_variant_name(serving.OURS, serving.json_object(costly))
    # the second round runs them in the other order
    assert [s.name for s in result.summaries] == [
        serving.OURS, variant, f"{variant} (round 2)", f"{serving.OURS} (round 2)"
    ]
    assert result.get(variant).output_tokens == result.get(serving.OURS).output_tokens > 0
    assert f"output tok/s, {variant} / sansllm:" in text and '/v1/completions streamed, with {"temperature"' in text
    assert f"output tok/s, {variant} / sansllm, per round (alternating order): x" in text and "; median x" in text


def test_decode_step_tool_times_and_profiles_a_tiny_model(tiny_model: str, capsys) -> None:
    from bench import decode_step

    decode_step.main(["--model", tiny_model, "--seqs", "3", "--prompt-len", "20", "--steps", "2", "--profile"])
    out = capsys.readouterr().out
    assert "decode step, 3 sequences, torch." in out
    assert "Self CPU time total" in out
