"""Read a llama.cpp GGUF file: model config from its metadata, dequantized weights under HF names.

llama.cpp's converter permutes the rows of Q and K so its interleaved (GPT-J style) rotary
works; we use HF's rotate-half rotary, so we undo that permutation as transformers' GGUF loader
does. Only the `llama` architecture is permuted by llama.cpp; `qwen2` and `gemma3` use NeoX rotary
there and are stored as is. llama.cpp stores Gemma's norm weights as 1 + w (its RMSNorm scales by the
weight itself); we give them back as w, transformers' convention, as its GGUF loader does.
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize, quant_shape_to_byte_shape
from tqdm import tqdm

from engine.model_config import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    ModelConfig,
    gemma3_layer_types,
    unsupported,
)
from engine.quantized_weights import QuantizedTensor, can_keep

# GGUF general.architecture -> HF architecture
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}

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
# Gemma 3 norms both branches of a layer: llama.cpp's ffn_norm is its pre-feedforward norm there
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAMES_BY_ARCHITECTURE = {"gemma3": _GEMMA3_LAYER_NAMES}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"

logger = logging.getLogger(__name__)


class GGUFModel:
    """An open GGUF file: `config`, `metadata`, and `weights()` to stream the tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        started = time.perf_counter()
        self.reader: GGUFIndex | GGUFReader = GGUFIndex.open(self.path)
        self.metadata = (
            self.reader.metadata if isinstance(self.reader, GGUFIndex) else _read_metadata(self.reader)
        )
        logger.debug("read the GGUF header of %s in %.2f s", self.path.name, time.perf_counter() - started)
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
        config = ModelConfig(
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
        if arch == "gemma3":
            config = replace(config, **_gemma3_fields(key, config))
        return config

    def rope_freq_factors(self) -> torch.Tensor | None:
        """Llama 3.1-style per-frequency rope factors, when the file bakes them in."""
        for tensor in self.reader.tensors:
            if tensor.name == ROPE_FREQS:
                return torch.from_numpy(np.array(_dequantize(tensor))).flatten()
        return None

    def quantized_names(self) -> dict[str, int]:
        """HF name -> GGML type of every 2-D tensor that `weights(keep_quantized=True)` yields quantized."""
        return {
            hf_name(t.name, self.gguf_architecture): int(t.tensor_type)
            for t in self.reader.tensors
            if t.name != ROPE_FREQS and len(t.shape) == 2 and can_keep(int(t.tensor_type), int(t.shape[0]))
        }

    def weights(
        self, dtype: torch.dtype, progress: bool = True, keep_quantized: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """Yield (HF name, tensor in `dtype`) for every weight, dequantizing as we go; with
        `keep_quantized`, the tensors `quantized_names()` lists come as `QuantizedTensor`s instead
        (their blocks copied out of the file, rows in HF order)."""
        cfg = self.config
        permute = self.gguf_architecture == "llama"
        kept = self.quantized_names() if keep_quantized else {}
        tensors = [t for t in self.reader.tensors if t.name != ROPE_FREQS]
        bar = tqdm(tensors, desc=f"Loading {self.path.name}", unit="tensor", disable=not progress)
        for tensor in bar:
            name = hf_name(tensor.name, self.gguf_architecture)
            quantized = name in kept
            weights = np.asarray(tensor.data) if quantized else _dequantize(tensor)
            if permute and ".q_proj." in name:
                weights = unpermute_rotary(weights, cfg.num_attention_heads)
            elif permute and ".k_proj." in name:
                weights = unpermute_rotary(weights, cfg.num_key_value_heads)
            # float tensors and blocks come back as read-only views of the file: copy them into torch
            values = torch.from_numpy(np.array(weights, copy=not weights.flags.writeable))
            if quantized:
                rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
                yield name, QuantizedTensor(values, kept[name], rows, cols)
            else:
                if self.gguf_architecture == "gemma3" and name.endswith("norm.weight"):
                    values = values - 1  # stored as 1 + w (see the module doc)
                yield name, values.to(dtype)


def _gemma3_fields(key: Any, config: ModelConfig) -> dict[str, Any]:
    """Gemma 3's settings from its GGUF metadata, with llama.cpp's defaults for what the file leaves
    out: every sixth layer global, a local rope base of 10000, queries scaled by 1/sqrt(head_dim)
    (by 1/sqrt(hidden / heads) for the 62-layer 27B), rope scaling on the global layers only."""
    layers = config.num_hidden_layers
    pattern = key("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per layer: True where the layer is local
        kinds = [SLIDING_ATTENTION if local else FULL_ATTENTION for local in pattern]
    else:
        kinds = gemma3_layer_types(layers, int(pattern or 6))
    big = layers == 62
    scalar = config.hidden_size // config.num_attention_heads if big else config.head_dim
    return {
        "sliding_window": int(key("attention.sliding_window", 4096)),
        "layer_types": tuple(kinds),
        "rope_local_theta": float(key("rope.freq_base_swa", 10_000.0)),
        "query_pre_attn_scalar": float(scalar),
        "final_logit_softcapping": key("final_logit_softcapping"),
        "hidden_act": "gelu_pytorch_tanh",
    }


def hf_name(gguf_name: str, architecture: str = "llama") -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (GGUF `architecture`'s names)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _LAYER_NAMES_BY_ARCHITECTURE.get(architecture, _LAYER_NAMES)
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in names:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{names[part]}.{kind}"


def unpermute_rotary(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its `permute` in convert_hf_to_gguf.py).

    llama.cpp reorders each head's rows from [first half, second half] to interleaved pairs;
    this restores the halves. Works for weights [rows, cols] and biases [rows].
    """
    head_dim = weights.shape[0] // num_heads
    w = weights.reshape(num_heads, head_dim // 2, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _dequantize(tensor: ReaderTensor) -> np.ndarray:
    fast = _DEQUANTIZE_FAST.get(tensor.tensor_type)
    weights = fast(tensor.data) if fast is not None else dequantize(tensor.data, tensor.tensor_type)
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


# ---- fast dequantization of the formats common GGUF files hold ----
# The same float32 operations as gguf-py's numpy code (`gguf.quants`), in the same order, so the
# results are identical bit for bit (tests/engine/test_cold_start.py), with fewer temporaries:
# about twice as fast.


def _block_rows(data: np.ndarray, type_size: int) -> np.ndarray:
    return np.asarray(data).reshape(-1, type_size)


def _scale(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 scale at byte `start` of every block, as float32 [n_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n_blocks, 16] packed bytes -> [n_blocks, 32]: low nibbles first, then the high ones."""
    half = qs.shape[1]
    out = np.empty((qs.shape[0], 2 * half), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[:, :half])
    np.right_shift(qs, 4, out=out[:, half:])
    return out


def _dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    blocks = _block_rows(data, GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0][1])
    q = _nibbles(blocks[:, 2:]).view(np.int8) - np.int8(8)
    return _shaped(_scale(blocks, 0) * q.astype(np.float32), data)


def _dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    blocks = _block_rows(data, GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1][1])
    out = _scale(blocks, 0) * _nibbles(blocks[:, 4:]).astype(np.float32)
    out += _scale(blocks, 2)
    return _shaped(out, data)


def _dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    blocks = _block_rows(data, GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][1])
    return _shaped(blocks[:, 2:].view(np.int8).astype(np.float32) * _scale(blocks, 0), data)


def _shaped(values: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Blocks of values back in the tensor's shape ([..., bytes per row] -> [..., elements per row])."""
    return values.reshape(*data.shape[:-1], -1)


_DEQUANTIZE_FAST = {
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
}


# ---- a fast GGUF header reader ----

_GGUF_MAGIC = 0x46554747  # "GGUF" little-endian
_SCALARS = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<?"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_NUMPY_TYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_ELEMENT_TYPES = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFIndex:
    """A GGUF file's metadata and tensors, as `gguf.GGUFReader` gives them, read much faster.

    GGUFReader builds numpy views for every string of the tokenizer's arrays (about 100k for a
    49k vocabulary): seconds of a cold start. This reads the header with `struct` and keeps the
    tokenizer's large arrays as counts (`_read_metadata` did the same); the tokenizer loader
    reads them itself. `tensors` are gguf's own `ReaderTensor`s over a memory map of the file
    (`field` None). Little-endian GGUF v2/v3; `open` falls back to GGUFReader for anything else.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = np.memmap(path, mode="r")
        self.metadata: dict[str, Any] = {}  # as `_read_metadata(GGUFReader(path))` gives it
        self.tensors: list[ReaderTensor] = []
        self._parse()

    @classmethod
    def open(cls, path: Path) -> GGUFIndex | GGUFReader:
        with open(path, "rb") as f:
            head = f.read(8)
        if len(head) == 8:
            magic, version = struct.unpack("<II", head)
            if magic == _GGUF_MAGIC and version in (2, 3):
                return cls(path)
        return GGUFReader(path)  # big-endian, old or broken files: gguf's reader says what is wrong

    def _parse(self) -> None:
        buf = self.data
        offset = 8
        (version,) = _U32.unpack_from(buf, 4)
        tensor_count, kv_count = struct.unpack_from("<QQ", buf, offset)
        offset += 16
        self.metadata.update(
            {"GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count}
        )
        for _ in range(kv_count):
            key, offset = self._string(offset)
            (value_type,) = _U32.unpack_from(buf, offset)
            offset += 4
            value, offset = self._value(key, value_type, offset)
            if key in self.metadata:
                raise ValueError(f"duplicate GGUF key {key!r}")
            self.metadata[key] = value
        infos = []
        for _ in range(tensor_count):
            name, offset = self._string(offset)
            (n_dims,) = _U32.unpack_from(buf, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, offset + 4)
            offset += 4 + 8 * n_dims
            raw_type, tensor_offset = struct.unpack_from("<IQ", buf, offset)
            offset += 12
            infos.append((name, dims, raw_type, tensor_offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("Invalid alignment: must be a non-zero power of two")
        start = -(-offset // alignment) * alignment
        names: set[str] = set()
        for name, dims, raw_type, tensor_offset in infos:
            if name in names:
                raise ValueError(f"Found duplicated tensor with name {name}")
            names.add(name)
            self.tensors.append(self._tensor(name, dims, raw_type, start + tensor_offset))

    def _tensor(self, name: str, dims: tuple[int, ...], raw_type: int, data_offset: int) -> ReaderTensor:
        ggml_type = GGMLQuantizationType(raw_type)
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block_size
        shape = tuple(reversed(dims))
        element = _ELEMENT_TYPES.get(ggml_type)
        raw = self.data[data_offset : data_offset + n_bytes]
        if element is not None:
            data = raw.view(element).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, ggml_type))
        return ReaderTensor(
            name=name,
            tensor_type=ggml_type,
            shape=np.array(dims, dtype=np.uint64),
            n_elements=n_elements,
            n_bytes=n_bytes,
            data_offset=data_offset,
            data=data,
            field=None,  # type: ignore[arg-type]
        )

    def _string(self, offset: int) -> tuple[str, int]:
        (length,) = _U64.unpack_from(self.data, offset)
        start = offset + 8
        return bytes(self.data[start : start + length]).decode("utf-8"), start + length

    def _value(self, key: str, value_type: int, offset: int) -> tuple[Any, int]:
        buf = self.data
        scalar = _SCALARS.get(value_type)
        if scalar is not None:
            return scalar.unpack_from(buf, offset)[0], offset + scalar.size
        if value_type == _STRING:
            return self._string(offset)
        if value_type != _ARRAY:
            raise ValueError(f"unknown GGUF value type {value_type} for {key!r}")
        item_type, count = struct.unpack_from("<IQ", buf, offset)
        offset += 12
        counted = key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in _COUNTED_ARRAYS
        if item_type == _STRING:
            if counted:  # walk past the strings without decoding them
                for _ in range(count):
                    offset += 8 + _U64.unpack_from(buf, offset)[0]
                return range(count), offset
            items = []
            for _ in range(count):
                item, offset = self._string(offset)
                items.append(item)
            return items, offset
        element = _NUMPY_TYPES.get(item_type)
        if item_type == _ARRAY:  # arrays of arrays: each item is a whole array value
            items = []
            for _ in range(count):
                item, offset = self._value(key, _ARRAY, offset)
                items.append(item)
            return items, offset
        if element is None:
            raise ValueError(f"unknown GGUF array item type {item_type} for {key!r}")
        size = np.dtype(element).itemsize * count
        if counted:
            return range(count), offset + size
        values = np.frombuffer(buf, dtype=element, count=count, offset=offset).tolist()
        return values, offset + size


_COUNTED_ARRAYS = ("tokens", "scores", "token_type", "merges")
