"""Our Gemma 3 text decoder (`Gemma3ForCausalLM`, GGUF architecture `gemma3`) in plain torch.

It differs from Llama in the layer, not in how it is run: the same flat token batches, paged
attention and stacked q/k/v and gate/up projections (`engine.models.llama.Linear`, so GGUF blocks
stay quantized the same way). It builds on `LlamaForCausalLM` for loading, packing and logits, and
differs in:

- token embeddings scaled by sqrt(hidden_size), the scale rounded to the model's dtype first;
- RMSNorm that scales by (1 + w): `load_weights` stores 1 + w, so the shared RMSNorm kernels run it
  (in float32 that is exactly transformers' float32 product; in 16-bit the normed row is rounded
  before the scale, as for Llama);
- q_norm / k_norm over each head before rotary, and four norms per layer: input, post-attention,
  pre-feedforward, post-feedforward, each branch normed before it joins the residual stream;
- attention scaled by `query_pre_attn_scalar ** -0.5`;
- GELU(tanh)-gated MLP;
- local layers that attend over a sliding window with their own rope base (10000), and global layers
  (every sixth by default) over the whole context with the global base and its rope scaling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.attention import AttentionMetadata, attend
from engine.model_config import ModelConfig, UnsupportedModelError
from engine.models import ops
from engine.models.llama import Linear, LlamaForCausalLM, RMSNorm, replace_rows
from engine.rope import cos_sin_cache, inverse_frequencies

if TYPE_CHECKING:
    from engine.quantized_weights import QuantizedTensor

SLIDING = "sliding_attention"
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def is_sliding(config: ModelConfig, layer: int) -> bool:
    """Whether `layer` is a local (sliding-window) layer."""
    return bool(config.layer_types) and config.layer_types[layer] == SLIDING


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.sliding_window = config.sliding_window if is_sliding(config, layer) else None
        self.split = [self.num_heads * self.head_dim, *2 * [self.num_kv_heads * self.head_dim]]
        self.qkv_proj = Linear(config.hidden_size, sum(self.split), bias=config.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        # per-head norms: one row of head_dim per (token, head)
        q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(tokens, -1)
        k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(tokens, -1)
        q, k = ops.rotary_embedding(positions, q, k, rope, self.head_dim)
        out = attend(
            self.layer,
            q.reshape(tokens, self.num_heads, self.head_dim),
            k.reshape(tokens, self.num_kv_heads, self.head_dim),
            v.reshape(tokens, self.num_kv_heads, self.head_dim),
            meta,
            self.scale,
            self.sliding_window,
        )
        return self.o_proj(out.reshape(tokens, -1))


class Gemma3MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.hidden_act not in _GELU_TANH:
            raise UnsupportedModelError(f"Gemma 3 with activation {config.hidden_act!r} is not supported")
        size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * size, bias=config.mlp_bias)
        self.down_proj = Linear(size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.gelu_tanh_and_mul(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.is_sliding = is_sliding(config, layer)
        self.input_layernorm = RMSNorm(size, eps)
        self.self_attn = Gemma3Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(size, eps)
        self.pre_feedforward_layernorm = RMSNorm(size, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = RMSNorm(size, eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed mlp output, residual): the next norm adds them, as in the Llama layer."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, positions, rope, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3's text model; loading (HF names, stacked and quantized weights), packing and logits are
    `LlamaForCausalLM`'s."""

    def __init__(self, config: ModelConfig, rope_freq_factors: torch.Tensor | None = None):
        nn.Module.__init__(self)
        if rope_freq_factors is not None:
            raise UnsupportedModelError("Gemma 3 with rope frequency factors is not supported")
        self.config = config
        self.model = Gemma3Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()

    def init_rope(self, rope_freq_factors: torch.Tensor | None = None) -> None:
        """Two rotary tables on the model's device: the global layers' (rope_theta with its scaling) and
        the local layers' (rope_local_theta, unscaled). A model built on `meta` must call this."""
        cfg = self.config
        device = self.model.norm.weight.device
        global_freq = inverse_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        local_freq = inverse_frequencies(cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta)
        for name, freq in (("rope_cache", global_freq), ("rope_local_cache", local_freq)):
            table = cos_sin_cache(freq, cfg.max_position_embeddings).to(device)
            self.register_buffer(name, table, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]; `embeds` as for Llama, placed
        after the scale (transformers' Gemma 3 scatters image features into scaled embeddings)."""
        x = self.model.embed_tokens(input_ids)
        # the scale in the activations' dtype, as transformers rounds it
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype, device=x.device)
        x = replace_rows(x, embeds)
        residual = None
        for layer in self.model.layers:
            rope = self.rope_local_cache if layer.is_sliding else self.rope_cache
            x, residual = layer(x, residual, positions, rope, meta)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab], soft-capped where the config says so."""
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """transformers' names and values; norm weights w are stored as 1 + w (see the module doc)."""
        super().load_weights((name, _one_plus(name, tensor)) for name, tensor in weights)


def _one_plus(name: str, tensor: torch.Tensor | QuantizedTensor) -> torch.Tensor | QuantizedTensor:
    """1 + w for a norm weight (in float32, as transformers adds it); other tensors as they come. Norm
    weights are vectors, which GGUF files store as floats: they never arrive quantized."""
    if not name.endswith("norm.weight"):
        return tensor
    assert isinstance(tensor, torch.Tensor), f"{name} arrived quantized"
    return tensor.float() + 1.0
