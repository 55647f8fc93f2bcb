"""Our LLaVA-style vision-language model (`LlavaForConditionalGeneration`) in plain torch.

A CLIP vision tower turns each image into patch features; a two-layer projector maps them into the
language model's embedding space; the language model (our `LlamaForCausalLM`) runs as any decoder
on the paged KV cache. Images enter as input embeddings: the prompt holds one placeholder token
per image feature, and the runner replaces those rows' embeddings (`forward(..., embeds=...)`)
with rows of `embed_images`. So the decoder, its cache and the scheduler see an ordinary token
sequence, and `config` is the language model's `ModelConfig`.

Checkpoints come in two layouts, both read: transformers 5's module names (`model.vision_tower.`,
`model.multi_modal_projector.`, `model.language_model.`, `lm_head.`) and the hub's, which
transformers 5 still saves (`vision_tower.`, `multi_modal_projector.`, `language_model.model.`,
`language_model.lm_head.`). Below `vision_tower.`, transformers 4 wrote one more level
(`vision_model.`), transformers 5 none: both are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.image_processor import ImageProcessor
from engine.model_config import ModelConfig, UnsupportedModelError
from engine.models.clip import CLIPVisionConfig, CLIPVisionTower, activation, feature_layers
from engine.models.llama import Linear, LlamaForCausalLM
from engine.quantized_weights import QuantizedTensor
from protocol.media.spec import ImageProcessing

ARCHITECTURE = "LlavaForConditionalGeneration"
STRATEGIES = ("default", "full")

# LlavaConfig's vision tower when config.json gives none (CLIP ViT-L/14 at 336 pixels)
_DEFAULT_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}

# checkpoint prefix -> (component, the prefix of its name inside the component)
_LAYOUT = (
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.language_model.", "language", "model."),
    ("language_model.model.", "language", "model."),
    ("language_model.lm_head.", "language", "lm_head."),
    ("lm_head.", "language", "lm_head."),
)


@dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA config.json: the language model's `ModelConfig`, the vision tower's and the glue."""

    text: ModelConfig
    vision: CLIPVisionConfig
    feature_layers: tuple[int, ...]  # non-negative indices into the tower's hidden states
    select_strategy: str  # "default": drop the class token's feature; "full": keep it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_token_id: int = 32000

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlavaConfig:
        vision = CLIPVisionConfig.from_hf(config.get("vision_config") or _DEFAULT_VISION)
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in STRATEGIES:
            raise UnsupportedModelError(f"vision_feature_select_strategy {strategy!r} is not supported")
        act = config.get("projector_hidden_act", "gelu")
        activation(act)
        token = config.get("image_token_id", config.get("image_token_index", 32000))
        return cls(
            text=ModelConfig.from_hf(config),
            vision=vision,
            feature_layers=feature_layers(config.get("vision_feature_layer", -2), vision.num_hidden_layers),
            select_strategy=strategy,
            projector_hidden_act=act,
            projector_bias=bool(config.get("multimodal_projector_bias", True)),
            image_token_id=int(token),
        )

    @property
    def image_tokens(self) -> int:
        """Placeholder positions (= embeddings) per image: one per patch, plus the class token's
        under the "full" strategy."""
        return self.vision.num_patches + (self.select_strategy == "full")


class MultiModalProjector(nn.Module):
    """Vision features (the chosen layers concatenated) -> the language model's embedding space."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        text = config.text.hidden_size
        features = config.vision.hidden_size * len(config.feature_layers)
        self.linear_1 = Linear(features, text, bias=config.projector_bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = Linear(text, text, bias=config.projector_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaForConditionalGeneration(nn.Module):
    """Vision tower + projector + language model; see the module docstring for how images get in."""

    def __init__(
        self,
        config: LlavaConfig,
        processor: ImageProcessor | None = None,
        language_model_class: type[LlamaForCausalLM] = LlamaForCausalLM,
    ):
        super().__init__()
        self.llava_config = config
        self.config = config.text  # the paged KV cache and the runner size themselves from this
        self.processor = processor or ImageProcessor(ImageProcessing())
        self.vision_tower = CLIPVisionTower(config.vision, config.feature_layers)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = language_model_class(config.text)

    @property
    def image_tokens(self) -> int:
        return self.llava_config.image_tokens

    def init_rope(self, rope_freq_factors: torch.Tensor | None = None) -> None:
        """The language model's rotary table; a model built on `meta` must call this."""
        self.language_model.init_rope(rope_freq_factors)

    # ---- images ----

    def pixel_values(self, data: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
        """uint8 RGB [H, W, 3] (resized and cropped by the core) -> normalised [3, H, W] in the
        model's dtype, on its device."""
        weight = self.vision_tower.embeddings.patch_embedding.weight
        return self.processor.pixel_values(data, shape, weight.dtype, weight.device)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, image_tokens, text hidden]: the rows that replace each image's placeholders."""
        states = self.vision_tower(pixel_values)
        if self.llava_config.select_strategy == "default":
            states = [state[:, 1:] for state in states]
        features = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        return self.multi_modal_projector(features)

    # ---- the decoder ----

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]; `embeds` = (rows [K], values
        [K, hidden]): the rows whose input embedding is `values` instead of their token's."""
        return self.language_model(input_ids, positions, meta, embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def pack_weights(self, storage: torch.dtype | None = None) -> None:
        """The language model's projections only (see `LlamaForCausalLM.pack_weights`): they run for
        every token; the tower and projector run once per image and keep their plain weights."""
        self.language_model.pack_weights(storage)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedTensor]]) -> None:
        """Copy checkpoint tensors (either layout, see the module docstring) into our parameters;
        every parameter must be filled and every tensor must have a place (bar the tower's unread ones)."""
        vision = _Slots(self.vision_tower, "vision_tower.")
        projector = _Slots(self.multi_modal_projector, "multi_modal_projector.")

        def language() -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
            for name, tensor in weights:
                part, rest = _component(name)
                if part == "vision":
                    target = self.vision_tower.checkpoint_name(rest)
                    if target is not None:
                        vision.fill(target, tensor, name)
                elif part == "projector":
                    projector.fill(rest, tensor, name)
                else:
                    yield rest, tensor

        try:
            self.language_model.load_weights(language())
        except ValueError as error:  # name the component: the language model's names lack its prefix
            message = str(error)
            if message.startswith("checkpoint lacks tensors for: "):
                what = message.removeprefix("checkpoint lacks tensors for: ")
                raise ValueError(f"checkpoint lacks tensors for the language model: {what}") from error
            raise
        vision.check()
        projector.check()


def _component(name: str) -> tuple[str, str]:
    """(vision / projector / language, the name inside it) of a checkpoint tensor."""
    for prefix, part, inner in _LAYOUT:
        if name.startswith(prefix):
            return part, inner + name.removeprefix(prefix)
    raise ValueError(f"checkpoint tensor {name!r} has no place in {ARCHITECTURE}")


class _Slots:
    """The parameters of one component still to fill, for weights that arrive in any order."""

    def __init__(self, module: nn.Module, prefix: str):
        self.params = dict(module.named_parameters())
        self.missing = set(self.params)
        self.prefix = prefix

    def fill(self, target: str, tensor: torch.Tensor | QuantizedTensor, name: str) -> None:
        if target not in self.params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {ARCHITECTURE}")
        if isinstance(tensor, QuantizedTensor):
            tensor = tensor.dequantize()
        dest = self.params[target].data
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        self.missing.discard(target)

    def check(self) -> None:
        if self.missing:
            names = sorted(self.prefix + name for name in self.missing)
            raise ValueError(f"checkpoint lacks tensors for: {', '.join(names[:8])}")
