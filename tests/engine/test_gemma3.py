"""Our Gemma 3 on tiny random weights against transformers' Gemma3ForCausalLM (float32, eager attention).

The model has a sliding window of 4 with local and global layers mixed, so prompts of ~20 tokens and
decode steps run far past the window on the local layers while the global ones see everything;
query_pre_attn_scalar differs from head_dim, and head_dim from hidden_size / heads, so each scale
and shape is checked. Tolerance as for the Llama models: 1e-4 on float32 logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma3ForCausalLM as HFGemma3
from transformers import Gemma3TextConfig

from engine.engine import Engine, EngineConfig
from engine.gguf_file import _gemma3_fields, hf_name
from engine.loader import LoadedModel, load_model
from engine.model_config import ModelConfig
from engine.model_files import resolve_model
from engine.models.gemma3 import Gemma3ForCausalLM
from protocol.engine_api import Generate, SamplingParams
from tests.engine.paged import PagedRunner
from tests.engine.tiny_models import train_tokenizer

ATOL = 1e-4
WINDOW = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
PROMPTS = [
    "The capital of France is Paris. Hello world! A quick brown fox",
    "Hello world! 0123456789",
    "A quick brown fox jumps over the lazy dog; the capital of Italy is Rome.",
]


def build_gemma3(folder: Path, **overrides: Any) -> Path:
    """A tiny random Gemma 3 HF folder (config.json, safetensors, tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    shape: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": WINDOW,
        "layer_types": LAYER_TYPES,
        "max_position_embeddings": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id or 0,
    }
    shape.update(overrides)
    torch.manual_seed(0)
    model = HFGemma3(Gemma3TextConfig(**shape))
    with torch.no_grad():  # norms start at zero (scale 1 + w): randomise everything
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma3(tmp_path_factory.mktemp("models") / "tiny-gemma3")


@pytest.fixture(scope="module")
def loaded(tiny_gemma3: Path) -> LoadedModel:
    return load_model(resolve_model(str(tiny_gemma3)), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def reference(tiny_gemma3: Path) -> HFGemma3:
    return HFGemma3.from_pretrained(tiny_gemma3, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model: HFGemma3, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def test_loads_as_gemma3_with_its_layer_kinds(loaded):
    assert isinstance(loaded.model, Gemma3ForCausalLM)
    cfg = loaded.config
    assert (cfg.sliding_window, cfg.layer_types, cfg.head_dim) == (WINDOW, tuple(LAYER_TYPES), 32)
    assert (cfg.query_pre_attn_scalar, cfg.rope_local_theta, cfg.rope_theta) == (24.0, 10_000.0, 1_000_000.0)
    windows = [layer.self_attn.sliding_window for layer in loaded.model.model.layers]
    assert windows == [WINDOW, None, WINDOW, WINDOW]


def test_prefill_logits_match_transformers(loaded, reference):
    for prompt in PROMPTS:
        ids = loaded.tokenizer.encode(prompt)
        assert len(ids) > 2 * WINDOW
        runner = PagedRunner(loaded.model, max_len=128, max_seqs=1)
        torch.testing.assert_close(runner.logits([("s", ids)]), hf_logits(reference, ids), atol=ATOL, rtol=0)


def test_chunks_and_decode_steps_past_the_window_match_one_prefill(loaded, reference):
    ids = loaded.tokenizer.encode(PROMPTS[2])
    chunks = [ids[:3], ids[3:11]] + [[t] for t in ids[11:]]  # a prefill, a chunk on cached context, decodes
    runner = PagedRunner(loaded.model, max_len=128, max_seqs=1, block_size=4)
    ours = torch.cat([runner.logits([("s", chunk)]) for chunk in chunks])
    torch.testing.assert_close(ours, hf_logits(reference, ids), atol=ATOL, rtol=0)


def test_sequences_in_one_flat_batch_keep_their_own_windows(loaded, reference):
    a, b, c = (loaded.tokenizer.encode(p) for p in PROMPTS)
    runner = PagedRunner(loaded.model, max_len=128, max_seqs=3)
    runner.logits([("a", a[:-1]), ("b", b[:5])])
    # one step: a decode row past the window, a chunk on cached context, a whole new prompt
    logits = runner.logits([("a", a[-1:]), ("b", b[5:]), ("c", c)])
    torch.testing.assert_close(logits[0], hf_logits(reference, a)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1 : len(b) - 4], hf_logits(reference, b)[5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[len(b) - 4 :], hf_logits(reference, c), atol=ATOL, rtol=0)


def test_greedy_tokens_match_transformers_generate(tiny_gemma3, reference):
    engine = Engine(EngineConfig(model=str(tiny_gemma3), dtype="float32", progress=False, block_size=4))
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    events = engine.generate_sync([Generate(f"r{i}", tuple(ids), params) for i, ids in enumerate(prompts)])
    ours = {f"r{i}": [] for i in range(len(prompts))}
    for event in events:
        ours[event.request_id] += event.token_ids
    for i, ids in enumerate(prompts):
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, min_new_tokens=16
            )
        assert ours[f"r{i}"] == out[0, len(ids) :].tolist(), PROMPTS[i]
    assert engine.max_model_len == 128  # a per-layer window does not cap the context


def test_global_rope_scaling_and_old_config_format(tmp_path):
    """transformers 4's keys (rope_local_base_freq, sliding_window_pattern, rope_scaling on the global
    layers) and a logit soft-cap: read, and run as transformers runs them."""
    folder = build_gemma3(
        tmp_path / "old",
        layer_types=None,
        sliding_window_pattern=2,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        rope_local_base_freq=100.0,
        final_logit_softcapping=3.0,
    )
    raw = json.loads((folder / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):  # as a transformers 4 checkpoint has it
        raw.pop(key, None)
    raw.update(
        rope_theta=1_000_000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        sliding_window_pattern=2,
    )
    cfg = ModelConfig.from_hf(raw)
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    assert (cfg.rope_local_theta, cfg.rope_scaling["factor"], cfg.final_logit_softcapping) == (
        100.0,
        4.0,
        3.0,
    )
    (folder / "config.json").write_text(json.dumps(raw))
    ours = load_model(resolve_model(str(folder)), dtype="float32", progress=False)
    reference = HFGemma3.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = ours.tokenizer.encode(PROMPTS[0])
    logits = PagedRunner(ours.model, max_len=128, max_seqs=1).logits([("s", ids)])
    assert logits.abs().max() <= 3.0
    torch.testing.assert_close(logits, hf_logits(reference, ids), atol=ATOL, rtol=0)


def test_gguf_names_and_metadata_of_gemma3():
    assert hf_name("blk.2.ffn_norm.weight", "gemma3") == "model.layers.2.pre_feedforward_layernorm.weight"
    assert hf_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"  # llama
    assert (
        hf_name("blk.2.post_attention_norm.weight", "gemma3")
        == "model.layers.2.post_attention_layernorm.weight"
    )
    assert (
        hf_name("blk.2.post_ffw_norm.weight", "gemma3") == "model.layers.2.post_feedforward_layernorm.weight"
    )
    assert hf_name("blk.2.attn_q_norm.weight", "gemma3") == "model.layers.2.self_attn.q_norm.weight"
    with pytest.raises(ValueError):
        hf_name("blk.2.attn_q_norm.weight")  # not a llama tensor

    base = ModelConfig("Gemma3ForCausalLM", 10, 64, 96, 6, 4, 1, 32, 1e-6, 1e6, 128)
    metadata = {"attention.sliding_window": 8}
    fields = _gemma3_fields(metadata.get, base)
    assert fields["layer_types"] == ("sliding_attention",) * 5 + ("full_attention",)
    assert (fields["sliding_window"], fields["rope_local_theta"], fields["query_pre_attn_scalar"]) == (
        8,
        1e4,
        32,
    )
    pattern = [True, False, True, True, False, False]  # newer files list each layer: True for local
    fields = _gemma3_fields({**metadata, "attention.sliding_window_pattern": pattern}.get, base)
    assert [kind == "sliding_attention" for kind in fields["layer_types"]] == pattern
