"""GGUF models served on their quantized blocks: what stays quantized, the memory it takes, and greedy
output against the same model dequantized to float32 (the issue's acceptance: token identical, or
every divergence at a near tie of the float32 model)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

import kernels
from engine.loader import load_model
from engine.model_files import DEFAULT_MODEL, resolve_model
from engine.models.llama import Linear
from engine.offline import LLM
from engine.quantized_weights import QuantizedEmbedding, QuantizedMatrix, QuantizedTensor
from protocol.engine_api import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]
NEAR_TIE = 1e-3  # the bound on the float32 model's top-two logprob gap at a divergence
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "The three laws of robotics are",
    "Water boils at",
    "List three colors:",
    "import numpy as np\n",
    "The quick brown fox",
    "In 1969, humans",
    "My favourite food is",
    "Translate to French: cat ->",
    "The square root of 16 is",
    "Dear Sir,",
    "Q: What is 2+2?\nA:",
    "The best way to learn",
    "Photosynthesis is",
    "SELECT * FROM",
    "Roses are red,",
    "The meaning of life",
    "Hello, my name is",
]


def test_projections_and_embeddings_keep_their_gguf_blocks():
    source = resolve_model(DEFAULT_MODEL)
    loaded = load_model(source, "float32", "cpu", progress=False)
    model = loaded.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.quant, QuantizedMatrix) for m in linears)
    assert all(m.weight.numel() == 0 for m in linears)  # no float copy beside the blocks
    embedding = model.model.embed_tokens
    assert isinstance(embedding, QuantizedEmbedding)
    # tied: the output layer reads the embedding's blocks, not a copy
    assert model.lm_head.quant.parts[0].data.data_ptr() == embedding.blocks.data_ptr()
    blocks = {b.data_ptr(): b.numel() for b in model.buffers() if b.dtype == torch.uint8}
    assert sum(blocks.values()) <= source.path.stat().st_size


def test_dequantize_at_load_gives_float_weights():
    loaded = load_model(resolve_model(DEFAULT_MODEL), "float32", "cpu", progress=False, keep_quantized=False)
    assert not any(isinstance(m, QuantizedMatrix | QuantizedEmbedding) for m in loaded.model.modules())
    assert loaded.model.lm_head.weight.shape == (loaded.config.vocab_size, loaded.config.hidden_size)


def test_a_stacked_projection_with_parts_of_different_types_runs_each_part():
    """Q4_K_M files keep attn_v in Q6_K beside Q4_K q and k: one matrix, two kinds of blocks."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((rows, 64)).astype(np.float32) for rows in (8, 8, 4)]
    kinds = [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0]
    parts = [
        QuantizedTensor(torch.from_numpy(quantize(w, kind)), int(kind), w.shape[0], w.shape[1])
        for w, kind in zip(weights, kinds, strict=True)
    ]
    matrix = QuantizedMatrix(parts)
    assert [p.qtype for p in matrix.parts] == [8, 2]  # the two Q8_0 parts joined
    x = torch.randn(3, 64)
    expected = torch.cat([x @ p.dequantize().T for p in parts], dim=-1)
    with kernels.use_backend("torch"):  # the assembly is under test here, not the kernels' rounding
        torch.testing.assert_close(matrix(x), expected, atol=1e-5, rtol=1e-5)


def test_resident_memory_after_loading_is_within_one_and_a_half_times_the_file():
    """Measured in a fresh process: RSS growth from loading, after the code the load imports (torch,
    transformers' tokenizer conversion, the C++ kernels) is already in memory."""
    script = textwrap.dedent(
        f"""
        import gc, json
        from engine.gguf_file import GGUFModel
        from engine.loader import load_model
        from engine.model_files import resolve_model
        from engine.tokenizer import HFTokenizer
        import kernels.cpu_ops

        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024

        source = resolve_model({DEFAULT_MODEL!r})
        config = GGUFModel(source.path).config
        HFTokenizer.from_gguf(source.path, config.vocab_size, config.eos_token_ids)  # imports
        kernels.cpu_ops.load()
        gc.collect()
        before = rss()
        loaded = load_model(source, "bfloat16", "cpu", progress=False)
        gc.collect()
        print(json.dumps({{"growth": rss() - before, "file": source.path.stat().st_size}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = measured["growth"] / measured["file"]
    print(f"resident growth {measured['growth'] / 1e6:.1f} MB for a {measured['file'] / 1e6:.1f} MB file: {ratio:.2f}x")
    assert ratio <= 1.5


@pytest.mark.parametrize("model", [DEFAULT_MODEL, "gemma-3-270m"])  # Q4_1 + Q8_0; Q4_K, Q5_0, Q6_K, Q8_0
def test_greedy_output_on_the_blocks_matches_the_dequantized_model(model):
    float32_reference = LLM(model, dtype="float32", keep_quantized=False, progress=False, num_kv_blocks=256)
    quantized = LLM(model, dtype="float32", keep_quantized=True, progress=False, num_kv_blocks=256)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    # five prompts at a time: decode steps of 5 rows or fewer run the kernels' GEMV path (whole rows
    # tiles and a remainder), which many rows would leave for the batched one
    ours = [out for i in range(0, len(PROMPTS), 5) for out in quantized.generate(PROMPTS[i : i + 5], params)]
    reference = float32_reference.generate(PROMPTS, params)
    report = []
    for prompt, a, b in zip(PROMPTS, ours, reference, strict=True):
        got, want = a.outputs[0].token_ids, b.outputs[0].token_ids
        at = next((i for i, (x, y) in enumerate(zip(got, want, strict=True)) if x != y), None)
        if at is None:
            continue
        # the float32 model's view of the position where they part: how close was its choice?
        ids = [*a.prompt_token_ids, *want[:at]]
        probe = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        top = dict(float32_reference.generate([ids], probe)[0].outputs[0].logprobs[0].top)
        gap = top[want[at]] - top.get(got[at], float("-inf"))
        report.append((prompt, at, gap))
    print(f"{len(PROMPTS) - len(report)}/{len(PROMPTS)} identical; divergences (prompt, token, gap): {report}")
    assert all(gap <= NEAR_TIE for *_, gap in report), report


def test_float32_weights_kept_in_16_bits_compute_with_the_rounded_weights():
    """The storage `--dtype auto` picks on CPUs without bfloat16 math: float32 activations, bfloat16
    weights widened in registers; exact up to float32 summation order against the rounded weights."""
    torch.manual_seed(0)
    layer = Linear(96, 40, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    rounded = layer.weight.detach().bfloat16().float()
    x = torch.randn(5, 96)
    expected = x @ rounded.T + layer.bias
    layer.pack(keep_weight=False, storage=torch.bfloat16)
    assert layer.weight.numel() == 0 and layer.quant.parts[0].data.numel() == 40 * 96 * 2
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)


def test_weight_storage_rule(monkeypatch):
    from engine import loader

    quantized = load_model(resolve_model(DEFAULT_MODEL), "float32", "cpu", progress=False, keep_quantized=False)
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda *args: False)
    assert loader.resolve_weight_storage("auto", quantized) == torch.bfloat16
    assert loader.resolve_weight_storage("float32", quantized) is None  # asked for by name: as asked
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda *args: True)
    assert loader.resolve_weight_storage("auto", quantized) is None  # such CPUs run bfloat16 throughout
