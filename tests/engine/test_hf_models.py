"""Our Llama-family model, loaded from HF folders, gives transformers' logits.

Tolerance: 1e-4 absolute on float32 logits of magnitude ~3 (observed differences are ~2e-6; they
come from a different summation order in attention and the fused residual adds).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.loader import LoadedModel, load_model
from engine.model_files import resolve_model
from tests.engine.paged import PagedRunner
from tests.engine.tiny_models import build_model

ATOL = 1e-4
TEXT = "The capital of France is Paris. Hello world! A quick brown fox jumps over the lazy dog."


def load(folder: Path) -> LoadedModel:
    return load_model(resolve_model(str(folder)), progress=False)


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def our_logits(loaded: LoadedModel, chunks: list[list[int]]) -> torch.Tensor:
    """Logits for every token, feeding the sequence in `chunks` (a prefill, then more) through a paged cache."""
    runner = PagedRunner(loaded.model, max_len=256, max_seqs=1)
    return torch.cat([runner.logits([("seq", chunk)]) for chunk in chunks])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_prefill_logits_match_transformers(fixture, request):
    folder = request.getfixturevalue(fixture)
    loaded = load(folder)
    ids = loaded.tokenizer.encode(TEXT)
    torch.testing.assert_close(our_logits(loaded, [ids]), hf_logits(folder, ids), atol=ATOL, rtol=0)


def test_qwen2_has_qkv_biases_and_llama_has_none(tiny_llama, tiny_qwen2):
    assert load(tiny_qwen2).model.model.layers[0].self_attn.qkv_proj.bias is not None
    assert load(tiny_llama).model.model.layers[0].self_attn.qkv_proj.bias is None


def test_cached_decode_gives_the_same_logits_as_one_prefill(tiny_llama):
    loaded = load(tiny_llama)
    ids = loaded.tokenizer.encode(TEXT)
    # a prefill, a chunk after cached tokens, then single-token decode steps
    chunks = [ids[:10], ids[10:17]] + [[t] for t in ids[17:]]
    torch.testing.assert_close(our_logits(loaded, chunks), hf_logits(tiny_llama, ids), atol=ATOL, rtol=0)


def test_sequences_in_one_flat_batch_do_not_see_each_other(tiny_llama):
    loaded = load(tiny_llama)
    a = loaded.tokenizer.encode(TEXT)
    b = loaded.tokenizer.encode("Hello world! 0123456789")
    logits = PagedRunner(loaded.model, max_len=256, max_seqs=2).logits([("a", a), ("b", b)])
    torch.testing.assert_close(logits[: len(a)], hf_logits(tiny_llama, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[len(a) :], hf_logits(tiny_llama, b), atol=ATOL, rtol=0)


ROPE_SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "linear": {"rope_type": "linear", "factor": 4.0},
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(kind, tmp_path):
    folder = build_model(tmp_path / kind, "llama", rope_scaling=dict(ROPE_SCALINGS[kind]))
    loaded = load(folder)
    ids = loaded.tokenizer.encode(TEXT)
    reference = hf_logits(folder, ids)
    torch.testing.assert_close(our_logits(loaded, [ids]), reference, atol=ATOL, rtol=0)
    # the scaling matters: the same weights without it give other logits
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    config = json.loads((plain / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (plain / "config.json").write_text(json.dumps(config))
    assert (our_logits(load(plain), [ids]) - reference).abs().max() > 1e-2


def test_tied_embeddings_share_the_lm_head(tmp_path):
    folder = build_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    loaded = load(folder)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = loaded.tokenizer.encode(TEXT)
    torch.testing.assert_close(our_logits(loaded, [ids]), hf_logits(folder, ids), atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads(tmp_path, tiny_llama):
    """A checkpoint split over several files with model.safetensors.index.json."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    loaded = load(sharded)
    ids = loaded.tokenizer.encode(TEXT)
    torch.testing.assert_close(our_logits(loaded, [ids]), hf_logits(tiny_llama, ids), atol=ATOL, rtol=0)


def test_bfloat16_runs_close_to_float32(tiny_llama):
    ids = load(tiny_llama).tokenizer.encode(TEXT)
    loaded = load_model(resolve_model(str(tiny_llama)), dtype="bfloat16", progress=False)
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    logits = our_logits(loaded, [ids])
    assert logits.dtype == torch.float32
    assert (logits - hf_logits(tiny_llama, ids)).abs().max() < 0.5


def test_packed_weights_give_the_same_logits(tiny_llama):
    """Serving packs the projections into the CPU's faster layout and frees the plain copies."""
    loaded = load_model(resolve_model(str(tiny_llama)), dtype="bfloat16", progress=False)
    ids = loaded.tokenizer.encode(TEXT)
    plain = our_logits(loaded, [ids[:20], ids[20:]])
    loaded.model.pack_weights()
    projection = loaded.model.model.layers[0].mlp.down_proj
    if projection.packed is not None:  # a CPU with oneDNN bfloat16 support
        assert projection.weight.numel() == 0
    assert torch.equal(our_logits(loaded, [ids[:20], ids[20:]]), plain)
