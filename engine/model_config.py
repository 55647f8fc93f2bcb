"""The shape of a Llama-family model, read from an HF config.json or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# HF architecture name -> whether q/k/v projections always carry biases (Qwen2: yes, o_proj: no)
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}
# model_type -> architecture, for configs without an `architectures` list (SmolLM is llama)
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class UnsupportedModelError(ValueError):
    """The files describe a model this engine cannot run."""


def unsupported(what: str) -> UnsupportedModelError:
    from engine.registry import all_architectures  # the registry builds on this module

    supported = ", ".join(all_architectures())
    return UnsupportedModelError(
        f"{what} is not supported; supported architectures: {supported} (SmolLM models are Llama)"
    )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF config.json, refusing architectures we do not implement."""
        architectures = config.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None and not architectures:
            architecture = _MODEL_TYPES.get(config.get("model_type", ""))
        if architecture is None:
            name = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
            raise unsupported(f"architecture {name}")
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        # transformers 5 moved rope settings into `rope_parameters`; older configs use rope_theta/rope_scaling
        rope_params = config.get("rope_parameters") or {}
        rope_theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        use_sliding = config.get("use_sliding_window", architecture == "MistralForCausalLM")
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=SUPPORTED_ARCHITECTURES[architecture] or bool(config.get("attention_bias", False)),
            o_proj_bias=not SUPPORTED_ARCHITECTURES[architecture]
            and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope_scaling=rope_scaling,
            sliding_window=config.get("sliding_window") if use_sliding else None,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=_as_ids(config.get("eos_token_id")),
        )


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
