"""Our Whisper (`WhisperForConditionalGeneration`): an audio encoder and a text decoder, in plain torch.

How it runs in the engine: each request is a decoder prompt (`<|startoftranscript|>`, language,
task, ...) plus one audio window of at most 30 s. The window becomes log-mel features
(`input_features`), the encoder turns them into 1500 frames (`encode`), and each decoder layer's
cross-attention keys and values over those frames are computed once (`cross_kv`) and kept by the
runner while the sequence decodes. The decoder itself is an ordinary causal decoder on the paged
KV cache (`forward` over a flat batch of spans, `engine.attention.attend`), so the scheduler
batches Whisper's decode steps and prefills like any other sequences; `config` is the decoder's
`ModelConfig`, which sizes that cache.

The encoder runs once per 30 s window over a fixed 1500 frames with full (bidirectional)
attention: torch's SDPA over the whole window is the right tool there, as for the CLIP tower;
paged attention only pays for the decoder, whose keys and values grow token by token.

Parameter names follow transformers' checkpoints below `model.` (`encoder.*`, `decoder.*`), except
that the self-attention q/k/v projections are stacked into `qkv_proj` and the cross-attention's k/v
into `kv_proj` (one matmul instead of three / two). Whisper's k projections have no bias: the
stacked bias holds zeros there (a k bias would not change attention anyway: it adds the same
amount to every score of a query). `proj_out` is tied to the token embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, attend
from engine.model_config import ModelConfig, UnsupportedModelError
from engine.models.clip import activation
from engine.models.llama import Linear
from engine.quantized_weights import QuantizedTensor
from engine.whisper_features import FeatureSettings, LogMelFeatures

ARCHITECTURE = "WhisperForConditionalGeneration"

# transformers' WhisperConfig defaults (whisper-tiny's shape), for keys a config.json leaves out
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 51865,
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 4,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "activation_function": "gelu",
    "decoder_start_token_id": 50257,
    "eos_token_id": 50256,
    "bos_token_id": 50256,
}
_LAYER_NORM_EPS = 1e-5  # transformers' nn.LayerNorm default, which Whisper uses everywhere

# checkpoint name fragment -> (our stacked parameter's fragment, slice index)
_STACKED = {
    ".self_attn.q_proj.": (".self_attn.qkv_proj.", 0),
    ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
    ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2),
    ".encoder_attn.k_proj.": (".encoder_attn.kv_proj.", 0),
    ".encoder_attn.v_proj.": (".encoder_attn.kv_proj.", 1),
}
_ENCODER_POSITIONS = "encoder.embed_positions.weight"


@dataclass(frozen=True)
class WhisperConfig:
    """A Whisper config.json: the encoder's and the decoder's shapes (transformers' names)."""

    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_attention_heads: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    activation_function: str = "gelu"
    decoder_start_token_id: int = 50257
    eos_token_id: int = 50256
    bos_token_id: int | None = 50256

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> WhisperConfig:
        model_type = config.get("model_type", "whisper")
        if model_type != "whisper":
            raise UnsupportedModelError(f"model_type {model_type!r} is not Whisper")
        merged = {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        eos = merged["eos_token_id"]
        merged["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
        built = cls(**{name: merged[name] for name in cls.__dataclass_fields__})
        activation(built.activation_function)  # refuse an unknown one at load time
        for side in ("encoder", "decoder"):
            if built.d_model % getattr(built, f"{side}_attention_heads"):
                raise UnsupportedModelError(f"Whisper d_model must be a multiple of {side}_attention_heads")
        return built

    def decoder_config(self) -> ModelConfig:
        """The decoder as the paged KV cache and the runner see it (no rope: learned positions)."""
        heads = self.decoder_attention_heads
        return ModelConfig(
            architecture=ARCHITECTURE,
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            intermediate_size=self.decoder_ffn_dim,
            num_hidden_layers=self.decoder_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=self.d_model // heads,
            rms_norm_eps=_LAYER_NORM_EPS,
            rope_theta=0.0,
            max_position_embeddings=self.max_target_positions,
            tie_word_embeddings=True,
            qkv_bias=True,
            o_proj_bias=True,
            mlp_bias=True,
            bos_token_id=self.bos_token_id,
            eos_token_ids=(self.eos_token_id,),
            hidden_act=self.activation_function,
        )

    @property
    def frames(self) -> int:
        """Feature frames the encoder takes (two convolutions, the second with stride 2)."""
        return 2 * self.max_source_positions


@dataclass
class CrossInputs:
    """The audio side of one decoder step: per decoder layer, (keys, values) [S, frames, heads,
    head_dim] for the S spans of the step in span order (from `cross_kv`), and each span's rows."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    query_lens: list[int]


class SelfAttention(nn.Module):
    """Full attention over one window's frames (the encoder): torch SDPA, no cache."""

    def __init__(self, size: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, size // heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(size, 3 * size, bias=True)
        self.out_proj = Linear(size, size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, frames, _ = x.shape
        q, k, v = self.qkv_proj(x).view(n, frames, 3, self.num_heads, self.head_dim).unbind(2)
        # q scaled before the product, as transformers and openai do (then scale 1 in SDPA)
        out = F.scaled_dot_product_attention(
            (q * self.scale).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(n, frames, -1))


class EncoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        size = config.d_model
        self.self_attn_layer_norm = nn.LayerNorm(size, eps=_LAYER_NORM_EPS)
        self.self_attn = SelfAttention(size, config.encoder_attention_heads)
        self.final_layer_norm = nn.LayerNorm(size, eps=_LAYER_NORM_EPS)
        self.fc1 = Linear(size, config.encoder_ffn_dim, bias=True)
        self.fc2 = Linear(config.encoder_ffn_dim, size, bias=True)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Two convolutions (GELU after each, the second halving the frames), positions, pre-LN layers, final LN."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        size = config.d_model
        self.frames = config.frames
        self.act = activation(config.activation_function)
        self.conv1 = nn.Conv1d(config.num_mel_bins, size, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(size, size, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, size)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(size, eps=_LAYER_NORM_EPS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or features.shape[-1] != self.frames:
            raise ValueError(
                f"Whisper's encoder takes features [B, mels, {self.frames}], got {tuple(features.shape)}"
            )
        weight = self.conv1.weight
        x = self.act(self.conv1(features.to(device=weight.device, dtype=weight.dtype)))
        x = self.act(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class DecoderSelfAttention(nn.Module):
    """Causal self-attention over the sequence's paged KV cache (Whisper's decoder has no rope)."""

    def __init__(self, size: int, heads: int, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = heads, size // heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(size, 3 * size, bias=True)
        self.out_proj = Linear(size, size, bias=True)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        out = attend(self.layer, q * self.scale, k, v, meta, 1.0)
        return self.out_proj(out.reshape(tokens, -1))


class CrossAttention(nn.Module):
    """The decoder's attention over the encoder's frames: q from the decoder rows, k/v from `cross_kv`."""

    def __init__(self, size: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, size // heads
        self.scale = self.head_dim**-0.5
        self.q_proj = Linear(size, size, bias=True)
        self.kv_proj = Linear(size, 2 * size, bias=True)
        self.out_proj = Linear(size, size, bias=True)

    def keys_values(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, frames, d_model] -> (keys, values), each [B, frames, heads, head_dim]."""
        n, frames, _ = encoded.shape
        k, v = self.kv_proj(encoded).view(n, frames, 2, self.num_heads, self.head_dim).unbind(2)
        return k.contiguous(), v.contiguous()

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], rows: _SpanRows
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = (self.q_proj(x) * self.scale).view(tokens, self.num_heads, self.head_dim)
        keys, values = kv
        out = F.scaled_dot_product_attention(
            rows.pad(q).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), scale=1.0
        )
        return self.out_proj(rows.unpad(out.transpose(1, 2)).reshape(tokens, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: WhisperConfig, layer: int):
        super().__init__()
        size, heads = config.d_model, config.decoder_attention_heads
        self.self_attn_layer_norm = nn.LayerNorm(size, eps=_LAYER_NORM_EPS)
        self.self_attn = DecoderSelfAttention(size, heads, layer)
        self.encoder_attn_layer_norm = nn.LayerNorm(size, eps=_LAYER_NORM_EPS)
        self.encoder_attn = CrossAttention(size, heads)
        self.final_layer_norm = nn.LayerNorm(size, eps=_LAYER_NORM_EPS)
        self.fc1 = Linear(size, config.decoder_ffn_dim, bias=True)
        self.fc2 = Linear(config.decoder_ffn_dim, size, bias=True)
        self.act = activation(config.activation_function)

    def forward(
        self,
        x: torch.Tensor,
        meta: AttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],
        rows: _SpanRows,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), meta)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), kv, rows)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.max_target_positions, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model, eps=_LAYER_NORM_EPS)


class _SpanRows:
    """Where each span's rows sit in a [S, longest span, ...] batch, so cross-attention runs as one
    SDPA call over spans of different lengths (decode steps: one row each, no padding needed)."""

    def __init__(self, query_lens: Sequence[int], device: torch.device):
        self.spans, self.longest = len(query_lens), max(query_lens, default=0)
        self.index: torch.Tensor | None = None  # flat padded row of each real row; None: all spans equal
        if any(length != self.longest for length in query_lens):
            index = [s * self.longest + i for s, length in enumerate(query_lens) for i in range(length)]
            self.index = torch.tensor(index, device=device)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [S, longest, ...] (padding rows zero)."""
        if self.index is None:
            return x.view(self.spans, self.longest, *x.shape[1:])
        padded = x.new_zeros(self.spans * self.longest, *x.shape[1:])
        padded[self.index] = x
        return padded.view(self.spans, self.longest, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[S, longest, ...] -> [T, ...]."""
        flat = x.reshape(self.spans * self.longest, *x.shape[2:])
        return flat if self.index is None else flat[self.index]


class WhisperForConditionalGeneration(nn.Module):
    """Whisper's encoder and decoder; see the module docstring for how the engine drives them."""

    def __init__(self, config: WhisperConfig, features: FeatureSettings | None = None):
        super().__init__()
        self.speech_config = config
        self.config = config.decoder_config()  # the paged KV cache and the runner size themselves from this
        settings = features or FeatureSettings(feature_size=config.num_mel_bins)
        if settings.feature_size != config.num_mel_bins or settings.frames != config.frames:
            raise UnsupportedModelError(
                f"the feature extractor makes [{settings.feature_size}, {settings.frames}] features; "
                f"the encoder takes [{config.num_mel_bins}, {config.frames}]"
            )
        self.features = LogMelFeatures(settings)
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)
        self.proj_out = Linear(config.d_model, config.vocab_size)
        self.proj_out.weight = self.decoder.embed_tokens.weight

    def tie_weights(self) -> None:
        """`proj_out` shares the token embedding (again, after `to_empty` untied them)."""
        self.proj_out.weight = self.decoder.embed_tokens.weight

    # ---- audio ----

    def input_features(self, samples: torch.Tensor) -> torch.Tensor:
        """float32 samples [n] at 16 kHz (at most one window; longer is cut, shorter padded with
        silence) -> float32 log-mel features [num_mel_bins, 3000] on the samples' device."""
        return self.features(samples)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """[B, num_mel_bins, 3000] -> [B, 1500, d_model] in the model's dtype, on its device."""
        return self.encoder(features)

    def cross_kv(self, encoded: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, the cross-attention (keys, values) over `encoded` [B, 1500, d_model],
        each [B, 1500, heads, head_dim]: computed once per window, read by every decoder step."""
        return [layer.encoder_attn.keys_values(encoded) for layer in self.decoder.layers]

    # ---- the decoder ----

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        cross: CrossInputs | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] (a flat batch of spans, as for any decoder) -> hidden [T, d_model].
        The rows of span i cross-attend to `cross.kv[layer][0][i]` / `[1][i]`."""
        if cross is None:
            raise ValueError("Whisper's decoder needs the audio: pass cross=CrossInputs(...)")
        if sum(cross.query_lens) != input_ids.shape[0]:
            raise ValueError(f"the spans hold {sum(cross.query_lens)} rows, the step {input_ids.shape[0]}")
        if len(cross.kv) != len(self.decoder.layers):
            raise ValueError(
                f"cross holds {len(cross.kv)} layers, the decoder has {len(self.decoder.layers)}"
            )
        rows = _SpanRows(cross.query_lens, input_ids.device)
        decoder = self.decoder
        x = decoder.embed_tokens(input_ids) + decoder.embed_positions(positions)
        for layer, kv in zip(decoder.layers, cross.kv, strict=True):
            x = layer(x, meta, kv, rows)
        return decoder.layer_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, d_model] -> float32 logits [N, vocab] (the tied token embedding)."""
        return self.proj_out(hidden).float()

    def pack_weights(self, storage: torch.dtype | None = None) -> None:
        """The decoder's per-token projections only (see `LlamaForCausalLM.pack_weights`): the
        encoder and the cross-attention's k/v run once per window and keep their plain weights;
        `proj_out` keeps the embedding's weight it shares."""
        for name, module in self.decoder.named_modules():
            if isinstance(module, Linear) and not name.endswith("encoder_attn.kv_proj"):
                module.pack(keep_weight=False, storage=storage)
        self.proj_out.pack(keep_weight=True, storage=storage)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """Copy checkpoint tensors (transformers' names: `model.encoder.*`, `model.decoder.*`,
        `proj_out.weight`) into our parameters. Every parameter must be filled and every tensor must
        have a place, bar: `proj_out.weight` (tied to the token embedding; some checkpoints store a
        copy), the k projections' biases (zeros unless given) and the encoder's positions (the
        sinusoids every Whisper checkpoint stores, computed when absent)."""
        params = dict(self.named_parameters())
        missing = {(name, i) for name in params for i in range(_parts(name))}
        missing.discard(("proj_out.weight", 0))
        for name in params:  # k biases: zero unless the checkpoint says otherwise
            if name.endswith("qkv_proj.bias") or name.endswith("kv_proj.bias"):
                index = 1 if name.endswith("qkv_proj.bias") else 0
                _slice(name, params[name], index).zero_()
                missing.discard((name, index))
        for name, tensor in weights:
            if name == "proj_out.weight":
                continue
            target, index = _parameter_for(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {ARCHITECTURE}")
            if isinstance(tensor, QuantizedTensor):
                tensor = tensor.dequantize()
            param = params[target]
            dest = _slice(target, param, index) if _parts(target) > 1 else param.data
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            missing.discard((target, index))
        if (_ENCODER_POSITIONS, 0) in missing:
            positions = self.encoder.embed_positions.weight
            positions.data.copy_(sinusoids(*positions.shape))
            missing.discard((_ENCODER_POSITIONS, 0))
        if missing:
            names = sorted(_checkpoint_name(name, i) for name, i in missing)
            raise ValueError(f"checkpoint lacks tensors for: {', '.join(names[:8])}")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's encoder positions: [length, channels] sines then cosines at geometric timescales."""
    if channels % 2:
        raise UnsupportedModelError(f"sinusoidal positions need an even width, got {channels}")
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    scaled = torch.arange(length).view(-1, 1) * inv_timescales.view(1, -1)
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def _parameter_for(name: str) -> tuple[str, int]:
    """A checkpoint tensor's (our parameter, slice index in it)."""
    if not name.startswith("model."):
        raise ValueError(f"checkpoint tensor {name!r} has no place in {ARCHITECTURE}")
    name = name.removeprefix("model.")
    for fragment, (stacked, index) in _STACKED.items():
        if fragment in name:
            return name.replace(fragment, stacked), index
    return name, 0


def _checkpoint_name(target: str, index: int) -> str:
    """The checkpoint name that fills slice `index` of our parameter `target` (for error messages)."""
    for fragment, (stacked, i) in _STACKED.items():
        if stacked in target and i == index:
            return "model." + target.replace(stacked, fragment)
    return "model." + target if target != "proj_out.weight" else target


def _parts(name: str) -> int:
    if ".qkv_proj." in name:
        return 3
    return 2 if ".kv_proj." in name else 1


def _slice(target: str, param: torch.Tensor, index: int) -> torch.Tensor:
    """Slice `index` of a stacked parameter (each slice is d_model rows)."""
    rows = param.shape[0] // _parts(target)
    return param.data[index * rows : (index + 1) * rows]
