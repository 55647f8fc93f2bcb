"""The shape of a decoder (Llama family, Gemma 3), read from an HF config.json or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# HF architecture name -> whether q/k/v projections always carry biases (Qwen2: yes, o_proj: no)
SUPPORTED_ARCHITECTURES: dict[str, bool] = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
    "Gemma3ForCausalLM": False,
}
# model_type -> architecture, for configs without an `architectures` list (SmolLM is llama)
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
SLIDING_ATTENTION, FULL_ATTENTION = "sliding_attention", "full_attention"
# Vision-language architectures: a vision tower and a decoder from the list above (its config under
# `text_config`); their `ModelConfig` is the decoder's, under the vision-language architecture's name
MULTIMODAL_ARCHITECTURES = ("LlavaForConditionalGeneration",)
_MULTIMODAL_MODEL_TYPES = {"llava": "LlavaForConditionalGeneration"}
# Speech-to-text encoder-decoders (engine.models.whisper): their `ModelConfig` is the decoder's
SPEECH_ARCHITECTURES = ("WhisperForConditionalGeneration",)
_SPEECH_MODEL_TYPES = {"whisper": "WhisperForConditionalGeneration"}
_LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")  # what their decoder may be
# LlamaConfig's defaults, for the keys a LLaVA `text_config` leaves out (transformers writes only the
# differences from them: llava-1.5's text_config names little more than its vocab_size)
_LLAMA_DEFAULTS: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


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
    # Gemma 3: each layer's kind (SLIDING_ATTENTION layers see the last `sliding_window` positions,
    # FULL_ATTENTION ones all; empty: every layer is full), the sliding layers' rope base, the attention
    # scale's denominator (None: head_dim), tanh soft-capping of the logits, the MLP's activation
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF config.json, refusing architectures we do not implement; for a
        vision-language model, its language model's config under the model's architecture name."""
        if (multimodal := multimodal_architecture(config)) is not None:
            text = cls.from_hf(language_model_config(config))
            if text.architecture not in _LLAMA_FAMILY:
                raise unsupported(f"{multimodal} with a {text.architecture} language model")
            return replace(text, architecture=multimodal)
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
        built = cls(
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
        return replace(built, **_gemma3_fields(config)) if architecture == "Gemma3ForCausalLM" else built


def multimodal_architecture(config: dict[str, Any]) -> str | None:
    """The vision-language architecture an HF config.json describes, or None."""
    architectures = config.get("architectures") or []
    found = next((a for a in architectures if a in MULTIMODAL_ARCHITECTURES), None)
    if found is None and not architectures:
        found = _MULTIMODAL_MODEL_TYPES.get(config.get("model_type", ""))
    return found


def speech_architecture(config: dict[str, Any]) -> str | None:
    """The speech-to-text architecture an HF config.json describes (by its architectures, else its
    model_type), or None."""
    architectures = config.get("architectures") or []
    found = next((a for a in architectures if a in SPEECH_ARCHITECTURES), None)
    if found is None and config.get("model_type") in _SPEECH_MODEL_TYPES:
        found = _SPEECH_MODEL_TYPES[config["model_type"]]
    return found


def language_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A vision-language config.json's `text_config`, with LlamaConfig's defaults where it is a Llama
    one; the embeddings are tied when either level says so (as transformers' LlavaConfig decides)."""
    text = dict(config.get("text_config") or {})
    if text.get("model_type", "llama") == "llama":
        text = {**_LLAMA_DEFAULTS, **text}
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings")) or bool(
        text.get("tie_word_embeddings")
    )
    return text


def _gemma3_fields(config: dict[str, Any]) -> dict[str, Any]:
    """What a Gemma 3 text config.json says beyond the Llama fields, in either transformers format:
    4.x (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`) or 5.x
    (`rope_parameters` per layer type, `layer_types`)."""
    if config.get("attn_logit_softcapping") is not None:
        raise unsupported("Gemma 3 with attention logit soft-capping")
    if config.get("use_bidirectional_attention"):
        raise unsupported("Gemma 3 with bidirectional attention")
    params = config.get("rope_parameters") or {}
    full = dict(params.get(FULL_ATTENTION) or {})
    local = dict(params.get(SLIDING_ATTENTION) or {})
    if local.get("rope_type", "default") != "default":
        raise unsupported(f"Gemma 3 with {local['rope_type']!r} rope scaling on its sliding layers")
    rope_theta = full.pop("rope_theta", config.get("rope_theta", 1_000_000.0))
    scaling = config.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
    return {
        "rope_theta": float(rope_theta),
        "rope_scaling": scaling,
        "rope_local_theta": float(local.get("rope_theta", config.get("rope_local_base_freq", 10_000.0))),
        "sliding_window": config.get("sliding_window") or 4096,
        "layer_types": tuple(
            config.get("layer_types")
            or gemma3_layer_types(config["num_hidden_layers"], config.get("sliding_window_pattern") or 6)
        ),
        "query_pre_attn_scalar": float(config.get("query_pre_attn_scalar", 256)),
        "final_logit_softcapping": config.get("final_logit_softcapping"),
        "hidden_act": config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh",
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", True)),
    }


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3's default layout: every `pattern`-th layer global, the others sliding."""
    return [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers)]


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
