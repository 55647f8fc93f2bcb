"""A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`), read and checked
against the base model it is to run on.

Each adapted projection keeps `A` [rank, in] and `B` [out, rank] in float32, with PEFT's scaling
(`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA) already folded into `B`, so serving adds
`(x @ A.T) @ B.T` and nothing else. What we cannot serve (DoRA, trained biases, extra modules, the
embeddings or the LM head) is refused with the reason, never silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.model_config import ModelConfig

# PEFT's module names -> (our stacked projection, slice in it)
PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """The adapter cannot be served on this model; the message says why and what to do."""


@dataclass
class LoRAAdapter:
    """One adapter's weights: `weights[(layer, peft_module)] = (A [r, in], B [out, r] scaled)`."""

    name: str
    path: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each PEFT module name on this model."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def load_peft_adapter(name: str, path: str | Path, config: ModelConfig, max_rank: int) -> LoRAAdapter:
    """Read and check the adapter in folder `path` for a model of `config`; raises `AdapterError`."""
    folder = Path(path).expanduser()
    settings = _read_config(folder)
    rank = settings.get("r")
    alpha = settings.get("lora_alpha", rank)
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"LoRA adapter {name!r}: adapter_config.json has no valid rank 'r' (got {rank!r})")
    if rank > max_rank:
        raise AdapterError(
            f"LoRA adapter {name!r} has rank {rank}, above --max-lora-rank {max_rank}; "
            f"serve it with --max-lora-rank {rank} or more"
        )
    for key, refusal in (
        ("use_dora", "DoRA adapters are not supported"),
        ("modules_to_save", "adapters that also train whole modules (modules_to_save) are not supported"),
    ):
        if settings.get(key):
            raise AdapterError(f"LoRA adapter {name!r}: {refusal}")
    if settings.get("bias", "none") != "none":
        raise AdapterError(f"LoRA adapter {name!r}: trained biases (bias={settings['bias']!r}) are not supported")
    scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    tensors = _read_weights(folder, name)
    shapes = projection_shapes(config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise AdapterError(
                f"LoRA adapter {name!r}: tensor {key!r} adapts a module we cannot serve; supported: "
                f"{', '.join(PROJECTIONS)} of the decoder layers"
            )
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if module not in PROJECTIONS or layer >= config.num_hidden_layers:
            raise AdapterError(f"LoRA adapter {name!r}: tensor {key!r} has no place in this model")
        pairs.setdefault((layer, module), {})[which] = tensor
    adapter = LoRAAdapter(name, str(folder), rank)
    for (layer, module), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"LoRA adapter {name!r}: layer {layer} {module} lacks its lora_A or lora_B")
        a, b = pair["A"].float(), pair["B"].float()
        fan_in, fan_out = shapes[module]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(
                f"LoRA adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"expected {(rank, fan_in)} and {(fan_out, rank)}: was it trained for another base model?"
            )
        adapter.weights[layer, module] = (a.contiguous(), (b * scaling).contiguous())
    if not adapter.weights:
        raise AdapterError(f"LoRA adapter {name!r}: adapter_model.safetensors holds no LoRA weights")
    return adapter


def _read_config(folder: Path) -> dict:
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(
            f"no LoRA adapter at {str(folder)!r}: a PEFT adapter folder holds adapter_config.json and "
            "adapter_model.safetensors"
        )
    try:
        settings = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise AdapterError(f"cannot read {config_file}: {error}") from None
    if not isinstance(settings, dict):
        raise AdapterError(f"{config_file} is not a JSON object")
    peft_type = settings.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{config_file}: peft_type {peft_type!r} is not LoRA")
    return settings


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterError(
                f"LoRA adapter {name!r}: only adapter_model.bin (a pickle) is there; save the adapter with "
                "safetensors (PEFT's default, save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"LoRA adapter {name!r}: {weights_file} is missing")
    try:
        return load_file(str(weights_file))
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: say which
        raise AdapterError(f"cannot read {weights_file}: {type(error).__name__}: {error}") from None
