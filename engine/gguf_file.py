"""Read a llama.cpp GGUF file: model config from its metadata, dequantized weights under HF names.

llama.cpp's converter permutes the rows of Q and K so its interleaved (GPT-J style) rotary
works; we use HF's rotate-half rotary, so we undo that permutation as transformers' GGUF loader
does. Only the `llama` architecture is permuted by llama.cpp; `qwen2` uses NeoX rotary there and
is stored as is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from engine.model_config import ModelConfig, unsupported

# GGUF general.architecture -> HF architecture
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"


class GGUFModel:
    """An open GGUF file: `config`, `metadata`, and `weights()` to stream the tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = GGUFReader(self.path)
        self.metadata = _read_metadata(self.reader)
        self.gguf_architecture = str(self.metadata.get("general.architecture"))
        if self.gguf_architecture not in _ARCHITECTURES:
            raise unsupported(f"GGUF architecture {self.gguf_architecture!r}")
        self.config = self._config()

    def _config(self) -> ModelConfig:
        arch = self.gguf_architecture
        meta = self.metadata

        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{name}", default)

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        names = {t.name for t in self.reader.tensors}
        vocab = (
            key("vocab_size")
            or len(meta.get("tokenizer.ggml.tokens", ()))
            or _rows(self.reader, "token_embd.weight")
        )
        rope_scaling = None
        scaling_type = key("rope.scaling.type")
        if scaling_type not in (None, "none"):
            rope_scaling = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0))}
            if key("rope.scaling.original_context_length"):
                rope_scaling["original_max_position_embeddings"] = int(
                    key("rope.scaling.original_context_length")
                )
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture=_ARCHITECTURES[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("attention.key_length", hidden // heads)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            max_position_embeddings=int(key("context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_proj_bias="blk.0.attn_output.bias" in names,
            rope_scaling=rope_scaling,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    def rope_freq_factors(self) -> torch.Tensor | None:
        """Llama 3.1-style per-frequency rope factors, when the file bakes them in."""
        for tensor in self.reader.tensors:
            if tensor.name == ROPE_FREQS:
                return torch.from_numpy(np.array(_dequantize(tensor))).flatten()
        return None

    def weights(self, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, tensor in `dtype`) for every weight, dequantizing as we go."""
        cfg = self.config
        permute = self.gguf_architecture == "llama"
        tensors = [t for t in self.reader.tensors if t.name != ROPE_FREQS]
        bar = tqdm(tensors, desc=f"Loading {self.path.name}", unit="tensor", disable=not progress)
        for tensor in bar:
            name = hf_name(tensor.name)
            weights = _dequantize(tensor)
            if permute and ".q_proj." in name:
                weights = unpermute_rotary(weights, cfg.num_attention_heads)
            elif permute and ".k_proj." in name:
                weights = unpermute_rotary(weights, cfg.num_key_value_heads)
            # float tensors come back as read-only views of the file: copy them into torch
            yield name, torch.from_numpy(np.array(weights, copy=not weights.flags.writeable)).to(dtype)


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def unpermute_rotary(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its `permute` in convert_hf_to_gguf.py).

    llama.cpp reorders each head's rows from [first half, second half] to interleaved pairs;
    this restores the halves. Works for weights [rows, cols] and biases [rows].
    """
    head_dim = weights.shape[0] // num_heads
    w = weights.reshape(num_heads, head_dim // 2, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _dequantize(tensor: ReaderTensor) -> np.ndarray:
    weights = dequantize(tensor.data, tensor.tensor_type)
    # numpy order is the reverse of GGUF's dims: [rows(out), cols(in)], as torch's Linear wants
    return weights.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _rows(reader: GGUFReader, name: str) -> int:
    for tensor in reader.tensors:
        if tensor.name == name:
            return int(tensor.shape[-1])
    raise ValueError(f"GGUF file has no {name!r}")


def _read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Scalar and string fields; the large tokenizer arrays are left to the tokenizer loader."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in (
            "tokens",
            "scores",
            "token_type",
            "merges",
        ):
            out[key] = range(len(field.data))  # just the count
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - an exotic field type we do not need must not stop the load
            continue
    return out
