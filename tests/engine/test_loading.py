"""Finding model files, reading configs, GGUF conversion, tokenizer, generation defaults, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.gguf_file import GGUFModel, hf_name, unpermute_rotary
from engine.loader import build_model, cpu_has_native_bf16, load_model, resolve_dtype
from engine.model_config import ModelConfig, UnsupportedModelError
from engine.model_files import DEFAULT_MODEL, ModelNotFoundError, resolve_model
from engine.tokenizer import HFTokenizer
from tests.engine.paged import prefill_logits
from tests.engine.tiny_models import CHATML, write_json
from tests.engine.tiny_models import build_model as build_tiny

# ---- model files ----


def test_default_model_resolves_to_the_packaged_gguf():
    source = resolve_model(DEFAULT_MODEL)
    assert source.kind == "gguf"
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.is_file()
    assert source.name == DEFAULT_MODEL


def test_paths_resolve_to_gguf_files_and_hf_folders(tmp_path, tiny_llama):
    gguf_path = resolve_model(DEFAULT_MODEL).path
    assert resolve_model(str(gguf_path)).kind == "gguf"
    folder = resolve_model(str(tiny_llama))
    assert (folder.kind, folder.path, folder.name) == ("hf", tiny_llama.resolve(), "tiny-llama")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="SmolLM2-135M-Instruct"):
        resolve_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_embedding_model_unzips_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SANSLLM_CACHE", str(tmp_path))
    first = resolve_model("all-MiniLM-L6-v2")
    assert first.kind == "hf"
    assert (first.path / "config.json").is_file() and (first.path / "model.safetensors").is_file()
    assert first.path.is_relative_to(tmp_path)
    stamp = (first.path / "config.json").stat().st_mtime_ns
    assert resolve_model("all-MiniLM-L6-v2").path == first.path
    assert (first.path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no staging left behind


# ---- config ----


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        ModelConfig.from_hf({"architectures": ["BertModel"], "model_type": "bert"})
    folder = tmp_path / "gpt2"
    folder.mkdir()
    write_json(folder / "config.json", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(resolve_model(str(folder)), progress=False)


def test_mistral_and_qwen2_configs_map_to_our_model():
    base = dict(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    mistral = ModelConfig.from_hf({"architectures": ["MistralForCausalLM"], "sliding_window": 4096, **base})
    assert (mistral.sliding_window, mistral.qkv_bias, mistral.head_dim) == (4096, False, 4)
    qwen = ModelConfig.from_hf(
        {"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False, **base}
    )
    assert (qwen.architecture, qwen.qkv_bias, qwen.o_proj_bias, qwen.sliding_window) == (
        "Qwen2ForCausalLM",
        True,
        False,
        None,
    )


def test_unsupported_rope_scaling_is_refused(tmp_path):
    folder = build_tiny(tmp_path / "yarn", "llama")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    write_json(folder / "config.json", config)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_model(resolve_model(str(folder)), progress=False)


def test_dtype_auto_on_cpu_is_bfloat16_only_with_native_bf16(tmp_path, monkeypatch):
    from engine import loader

    detect = cpu_has_native_bf16  # imported at collection, before conftest pins `auto` to float32
    native = tmp_path / "native"
    native.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    plain = tmp_path / "plain"
    plain.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
    assert detect(str(native)) and not detect(str(plain))
    assert not detect(str(tmp_path / "missing"))
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda has=has_bf16: has)
        assert resolve_dtype("auto", torch.device("cpu"), "bfloat16") == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


# ---- generation defaults and tokenizer ----


def test_generation_config_gives_defaults_and_eos_ids(tmp_path, tiny_llama):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    write_json(
        folder / "generation_config.json",
        {
            "temperature": 0.6,
            "top_p": 0.9,
            "top_k": 20,
            "max_new_tokens": 64,
            "do_sample": True,
            "eos_token_id": [0, 2],
        },
    )
    loaded = load_model(resolve_model(str(folder)), progress=False)
    assert loaded.generation_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 64}
    assert loaded.tokenizer.eos_token_ids == {0, 2}
    assert load_model(resolve_model(str(tiny_llama)), progress=False).generation_defaults == {}


def test_tokenizer_round_trip_specials_and_template(tiny_llama):
    tok = load_model(resolve_model(str(tiny_llama)), progress=False).tokenizer
    ids = tok.encode("Hello world!")
    assert tok.decode(ids) == "Hello world!"
    assert tok.chat_template == CHATML
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1 and im_end[0] in tok.eos_token_ids
    assert im_end[0] in tok.all_special_ids
    assert tok.decode(ids + im_end) == "Hello world!"
    assert tok.decode(ids + im_end, skip_special_tokens=False) == "Hello world!<|im_end|>"
    assert "".join(tok.convert_ids_to_tokens(tok.encode(" world"))) == "Ġworld"
    assert (tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_start|>")


def test_chat_template_jinja_file_is_used_when_the_config_has_none(tmp_path, tiny_llama):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    write_json(folder / "tokenizer_config.json", config)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert HFTokenizer.from_folder(folder).chat_template == "{{ messages[0]['content'] }}"


def test_padded_vocabulary_ids_decode_to_nothing(tmp_path):
    """Qwen2 checkpoints have more embedding rows than tokens; those ids must not break decoding."""
    folder = build_tiny(tmp_path / "padded", "qwen2", vocab_size=400)
    tok = load_model(resolve_model(str(folder)), progress=False).tokenizer
    assert tok.vocab_size == 400
    ids = tok.encode("Hello")
    assert tok.decode([*ids, 399]) == "Hello"
    assert tok.convert_ids_to_tokens([399]) == [""]


# ---- GGUF ----


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_unpermute_undoes_llama_cpp_permutation():
    weights = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    permuted = llama_cpp_permute(weights, 8)
    assert not np.array_equal(permuted, weights)
    np.testing.assert_array_equal(unpermute_rotary(permuted, 8), weights)
    bias = np.arange(64, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(bias, 4), 4), bias)


def test_gguf_names_map_to_transformers_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    with pytest.raises(ValueError, match="unexpected GGUF tensor"):
        hf_name("blk.0.ssm_conv.weight")


def write_gguf_like_llama_cpp(folder: Path, path: Path) -> None:
    """Convert a tiny HF Llama to GGUF the way llama.cpp does (names, metadata, Q/K permutation)."""
    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    ours_to_gguf = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    ours_to_gguf["lm_head.weight"] = "output.weight"
    parts = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, tensor in load_file(folder / "model.safetensors").items():
        array = tensor.float().numpy()
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, kv_heads)
            gguf_name = f"blk.{layer}.{parts[module]}.{kind}"
        else:
            gguf_name = ours_to_gguf[name]
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits_of(model, ids: list[int]) -> torch.Tensor:
    return prefill_logits(model, ids)


def test_gguf_written_like_llama_cpp_gives_the_hf_folder_logits(tmp_path, tiny_llama):
    path = tmp_path / "tiny.gguf"
    write_gguf_like_llama_cpp(tiny_llama, path)
    file = GGUFModel(path)
    hf_config = ModelConfig.from_hf(json.loads((tiny_llama / "config.json").read_text()))
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
        assert getattr(file.config, field) == getattr(hf_config, field)
    assert file.config.tie_word_embeddings is False
    from_gguf = build_model(
        file.config, torch.float32, torch.device("cpu"), None, file.weights(torch.float32, False)
    )
    from_hf = load_model(resolve_model(str(tiny_llama)), progress=False).model
    ids = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10]
    torch.testing.assert_close(logits_of(from_gguf, ids), logits_of(from_hf, ids), atol=1e-5, rtol=0)


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        GGUFModel(path)
