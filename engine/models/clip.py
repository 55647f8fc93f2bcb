"""Our CLIP vision tower (the image encoder of LLaVA-style models) in plain torch.

It runs once per image, not once per generated token, so it uses torch's own ops (conv, layer norm,
SDPA over the whole image) rather than the paged-attention kernels the decoder needs; its
projections go through `engine.models.llama.Linear` so they follow the batch-invariant mode too.

LLaVA reads the hidden states of one or more encoder layers (`vision_feature_layer`), never the
final `post_layernorm`: the tower builds only the layers up to the deepest one read, and
`load_weights` accepts (and drops) the checkpoint tensors of the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_config import UnsupportedModelError
from engine.models.llama import Linear

# CLIPVisionConfig's defaults, for keys a config.json leaves out (transformers writes only the differences)
_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# transformers' ACT2FN names -> the same function
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation `name`; a clear error for one we do not implement."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The shape of a CLIP vision tower, from the `vision_config` of a LLaVA config.json."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> CLIPVisionConfig:
        model_type = config.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise UnsupportedModelError(
                f"vision tower {model_type!r} is not supported; supported: clip_vision_model"
            )
        merged = {**_DEFAULTS, **config}
        built = cls(**{name: merged[name] for name in _DEFAULTS})
        activation(built.hidden_act)  # refuse an unknown one at load time, not on the first image
        if built.hidden_size % built.num_attention_heads:
            raise UnsupportedModelError("CLIP hidden_size must be a multiple of num_attention_heads")
        return built

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class CLIPEmbeddings(nn.Module):
    """Patches (a bias-free conv with stride = kernel = patch) after a learned class token, plus positions."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.image_size = config.image_size
        size = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1 + patches, hidden]."""
        n, _, height, width = pixel_values.shape
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {height}x{width}")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(n, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    """Full (bidirectional) multi-head attention over one image's tokens."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = size // self.num_heads
        self.q_proj = Linear(size, size, bias=True)
        self.k_proj = Linear(size, size, bias=True)
        self.v_proj = Linear(size, size, bias=True)
        self.out_proj = Linear(size, size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(n, tokens, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


def feature_layers(layer: int | Sequence[int], num_hidden_layers: int) -> tuple[int, ...]:
    """`vision_feature_layer` (an index or a list into transformers' `hidden_states`: 0 is the
    embeddings after `pre_layrnorm`, i the output of layer i, negatives count from the end) as
    non-negative indices."""
    indices = (layer,) if isinstance(layer, int) else tuple(layer)
    if not indices:
        raise UnsupportedModelError("vision_feature_layer must name at least one layer")
    count = num_hidden_layers + 1
    for index in indices:
        if not -count <= index < count:
            raise UnsupportedModelError(
                f"vision_feature_layer {index} is out of range for a tower of {num_hidden_layers} layers"
            )
    return tuple(index % count for index in indices)


class CLIPVisionTower(nn.Module):
    """The CLIP vision transformer up to the deepest hidden state LLaVA reads.

    Parameter names are transformers' `CLIPVisionModel` names (`embeddings...`, `pre_layrnorm...`,
    `encoder.layers.{i}...`; transformers 4 nested them under `vision_model.`)."""

    def __init__(self, config: CLIPVisionConfig, layers: Sequence[int]):
        super().__init__()
        self.config = config
        self.feature_layers = tuple(layers)  # non-negative, see `feature_layers`
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, max(self.feature_layers))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, H, W] -> the hidden states of `feature_layers`, in their order, each [N, 1 + patches, hidden]."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return [states[index] for index in self.feature_layers]

    def checkpoint_name(self, name: str) -> str | None:
        """Our parameter for a checkpoint tensor named below the tower (with or without transformers 4's
        `vision_model.` level); None for
        the tensors LLaVA never reads (post_layernorm, layers past the deepest one read, the
        position_ids buffer of older checkpoints)."""
        name = name.removeprefix("vision_model.")
        if name.startswith("post_layernorm.") or name == "embeddings.position_ids":
            return None
        parts = name.split(".")
        if name.startswith("encoder.layers.") and parts[2].isdigit():
            if len(self.encoder.layers) <= int(parts[2]) < self.config.num_hidden_layers:
                return None
        return name
