"""Our Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in plain torch.

The forward pass takes a flat batch of tokens from many sequences (prefill chunks and decode
steps mixed), their absolute positions, and `AttentionMetadata` saying which tokens belong to
which sequence and cache. Parameter names follow transformers' checkpoints, except that q/k/v
and gate/up are stacked into one matrix each (one matmul instead of three / two);
`load_weights` takes checkpoint names and fills the stacked slices.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.attention import AttentionMetadata, attend
from engine.model_config import ModelConfig
from engine.models import ops
from engine.quantized_weights import QuantizedEmbedding, QuantizedMatrix, QuantizedTensor
from engine.rope import cos_sin_cache, inverse_frequencies

if TYPE_CHECKING:
    from engine.lora.manager import LoRALayer

# 16-bit weight storage -> its GGML type id (the quantized kernels read these as they read blocks)
_STORAGE_TYPES = {torch.float16: 1, torch.bfloat16: 30}

# checkpoint name fragment -> (our parameter fragment, slice index in the stacked matrix)
_STACKED = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class Linear(nn.Module):
    """`nn.Linear`'s parameters, computed by `kernels.linear` (which has a batch-invariant mode); or,
    for GGUF weights kept quantized, the blocks as they are (`quant`, run by `kernels.quant_linear`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None  # the weight in the device's faster layout, once packed
        self.quant: QuantizedMatrix | None = None
        self._quant_parts: list[QuantizedTensor | None] | None = None  # filled while loading
        self.lora: LoRALayer | None = None  # LoRA adapters' deltas, with --enable-lora (engine.lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            out = self.quant(x)
            out = out if self.bias is None else out + self.bias
        else:
            out = ops.linear(x, self.weight, self.bias, self.packed)
        if self.lora is not None:
            self.lora.add_to(out, x)
        return out

    def expect_quantized(self, parts: int) -> None:
        """Before the model is allocated (on meta): the weight will arrive as `parts` quantized
        tensors, so no float copy of it is ever allocated."""
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        self._quant_parts = [None] * parts

    @property
    def expects_quantized(self) -> bool:
        return self._quant_parts is not None

    def load_quantized(self, index: int, tensor: QuantizedTensor) -> None:
        """Take part `index` of a weight announced by `expect_quantized`; the last part completes it."""
        assert self._quant_parts is not None
        self._quant_parts[index] = tensor
        if all(part is not None for part in self._quant_parts):
            self.quant = QuantizedMatrix([part for part in self._quant_parts if part is not None])
            self._quant_parts = None

    def pack(self, *, keep_weight: bool, float32: bool = False, storage: torch.dtype | None = None) -> None:
        """Switch to the packed layout where the device has one; drop the plain weight unless it is shared.

        `float32`: pack float32 weights too (see `kernels.pack_linear_weight`). `storage` (bfloat16 or
        float16): keep a float32 weight in 16 bits instead, widened to float32 in registers by the
        quantized kernels (`engine.loader.resolve_weight_storage` says when that is faster)."""
        if self.packed is not None or self.quant is not None:
            return
        if storage is not None and self.weight.dtype == torch.float32:
            rows = self.weight.detach().to(storage).contiguous().view(torch.uint8)
            self.quant = QuantizedMatrix([QuantizedTensor(rows, _STORAGE_TYPES[storage], *self.weight.shape)])
            if not keep_weight:
                self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
            return
        self.packed = ops.pack_linear_weight(self.weight, float32=float32)
        if self.packed is not None and not keep_weight:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)


class RMSNorm(nn.Module):
    """RMSNorm; given `residual`, adds it first and returns (normed, new residual), as vLLM fuses it."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.split = [self.num_heads * self.head_dim, *2 * [self.num_kv_heads * self.head_dim]]
        self.qkv_proj = Linear(config.hidden_size, sum(self.split), bias=config.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q, k = ops.rotary_embedding(positions, q, k, rope, self.head_dim)
        out = attend(
            self.layer,
            q.reshape(tokens, self.num_heads, self.head_dim),
            k.reshape(tokens, self.num_kv_heads, self.head_dim),
            v.reshape(tokens, self.num_kv_heads, self.head_dim),
            meta,
            self.scale,
        )
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * size, bias=config.mlp_bias)
        self.down_proj = Linear(size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual stream carried separately: returns (mlp output, residual)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, rope, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaBackbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The model: `forward` gives final hidden states, `compute_logits` turns chosen rows into logits."""

    def __init__(self, config: ModelConfig, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope(rope_freq_factors)

    def init_rope(self, rope_freq_factors: torch.Tensor | None = None) -> None:
        """(Re)build the rotary table on the model's device; a model built on `meta` must call this."""
        cfg = self.config
        inv_freq = inverse_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, rope_freq_factors
        )
        device = self.model.norm.weight.device
        table = cos_sin_cache(inv_freq, cfg.max_position_embeddings).to(device)
        self.register_buffer("rope_cache", table, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]. `embeds` = (rows [K], values
        [K, hidden]): those rows take `values` as their input embedding instead of their token's (a
        vision-language model's image features, `engine.models.llava`)."""
        x = replace_rows(self.model.embed_tokens(input_ids), embeds)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, self.rope_cache, meta)
        x, _ = self.model.norm(x, residual)
        return x

    def pack_weights(self, storage: torch.dtype | None = None) -> None:
        """Give every projection the device's faster weight layout (`kernels.pack_linear_weight`), or
        16-bit `storage` for float32 weights (see `Linear.pack`).

        For serving, after loading: the plain copies are freed (the tied lm_head keeps the embedding's),
        so the packed model cannot load weights or switch to batch-invariant mode afterwards.
        """
        tied = self.lm_head.weight is getattr(self.model.embed_tokens, "weight", None)
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(keep_weight=module is self.lm_head and tied, storage=storage)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def expect_quantized(self, names: dict[str, int]) -> None:
        """Before allocation (on meta): the checkpoint tensors `names` (transformers names -> GGML
        type) will arrive quantized. A projection stays quantized when all its stacked parts do, the
        embedding when it does; the rest is dequantized as it arrives."""
        for target in {parameter_for(name)[0] for name in names}:
            parts = _parts(target)
            sources = [name for name in names if parameter_for(name)[0] == target]
            module = self.get_submodule(target.removesuffix(".weight"))
            if isinstance(module, Linear) and len(sources) == parts:
                module.expect_quantized(parts)
        if "model.embed_tokens.weight" in names:
            embedding = self.model.embed_tokens
            embedding.weight = nn.Parameter(embedding.weight.new_empty(0), requires_grad=False)
            if self.config.tie_word_embeddings:
                self.lm_head.expect_quantized(1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """Copy checkpoint tensors (transformers names) into our parameters; every one must be filled.

        A `QuantizedTensor` goes to a layer announced by `expect_quantized` as it is, and is
        dequantized into any other."""
        params = dict(self.named_parameters())
        missing = {(name, i) for name in params for i in range(_parts(name))}
        if self.config.tie_word_embeddings:
            missing.discard(("lm_head.weight", 0))
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # some tied checkpoints still store a copy
            target, index = parameter_for(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            if isinstance(tensor, QuantizedTensor) and self._take_quantized(target, index, tensor):
                missing.discard((target, index))
                continue
            if isinstance(tensor, QuantizedTensor):
                tensor = tensor.dequantize()
            param = params[target]
            dest = _stacked_slice(self, target, param, index) if _parts(target) > 1 else param.data
            _copy(dest, tensor, name)
            missing.discard((target, index))
        if missing:
            names = sorted(f"{name}[{i}]" if _parts(name) > 1 else name for name, i in missing)
            raise ValueError(f"checkpoint lacks tensors for: {', '.join(names[:8])}")

    def _take_quantized(self, target: str, index: int, tensor: QuantizedTensor) -> bool:
        """Keep `tensor` quantized where `expect_quantized` said it would be; False if not."""
        if target == "model.embed_tokens.weight":
            if self.model.embed_tokens.weight.numel() != 0:
                return False
            dtype = self.model.norm.weight.dtype
            self.model.embed_tokens = QuantizedEmbedding(tensor, dtype)
            if self.lm_head.expects_quantized:
                self.lm_head.load_quantized(0, tensor)
            return True
        module = self.get_submodule(target.removesuffix(".weight"))
        if not (isinstance(module, Linear) and module.expects_quantized):
            return False
        _check_rows(self, target, index, tensor)
        module.load_quantized(index, tensor)
        return True


def replace_rows(x: torch.Tensor, embeds: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Input embeddings `x` [T, hidden] with rows `embeds[0]` replaced by `embeds[1]` (in place)."""
    if embeds is not None:
        rows, values = embeds
        x[rows] = values.to(x.dtype)
    return x


def parameter_for(name: str) -> tuple[str, int]:
    """A checkpoint tensor's (our parameter, slice index in it): q/k/v and gate/up are stacked."""
    for fragment, (stacked, i) in _STACKED.items():
        if fragment in name:
            return name.replace(fragment, stacked), i
    return name, 0


def _check_rows(model: LlamaForCausalLM, target: str, index: int, tensor: QuantizedTensor) -> None:
    module = model.get_submodule(target.removesuffix(".weight"))
    rows = _slice_sizes(model, target)[index] if _parts(target) > 1 else module.out_features
    if (tensor.rows, tensor.cols) != (rows, module.in_features):
        raise ValueError(
            f"checkpoint tensor for {target}[{index}] has shape {(tensor.rows, tensor.cols)}, "
            f"expected {(rows, module.in_features)}"
        )


def _parts(name: str) -> int:
    """How many checkpoint tensors are stacked into our parameter `name`."""
    if ".qkv_proj." in name:
        return 3
    return 2 if ".gate_up_proj." in name else 1


def _slice_sizes(model: LlamaForCausalLM, target: str) -> list[int]:
    if ".qkv_proj." in target:
        cfg = model.config
        return [cfg.num_attention_heads * cfg.head_dim, *2 * [cfg.num_key_value_heads * cfg.head_dim]]
    return [model.config.intermediate_size] * 2


def _stacked_slice(model: LlamaForCausalLM, target: str, param: torch.Tensor, index: int) -> torch.Tensor:
    sizes = _slice_sizes(model, target)
    start = sum(sizes[:index])
    return param.data[start : start + sizes[index]]


def _copy(dest: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}"
        )
    dest.copy_(src)
