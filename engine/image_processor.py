"""A CLIP-style image processor's settings, read from an HF folder, and its tensor half.

transformers' `CLIPImageProcessor` resizes, center-crops, rescales (x / 255) and normalises
((x - mean) / std). The protocol core does the first two on 8-bit RGB with Pillow, as the PIL
backend does (it needs `ImageProcessing`, which the loader hands it in the model's
`MultimodalSpec`); the engine does the last two here, on tensors, with transformers' numerics:
the rescale in float64 rounded once to float32, the normalisation in float32.

Settings come from the processor files as the hub has them: `preprocessor_config.json` (the
image processor alone, older layout) or `processor_config.json` with the image processor under
`image_processor` (what transformers 5 writes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.model_config import UnsupportedModelError
from protocol.media.spec import ImageProcessing

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, CLIPImageProcessor's defaults
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessor:
    """Resize/crop settings for the core (`spec`) and the rescale/normalise the engine applies."""

    spec: ImageProcessing
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every processed image, or None when it depends on the input."""
        spec = self.spec
        if spec.do_center_crop:
            return spec.crop_height, spec.crop_width
        if spec.do_resize and spec.height is not None and spec.width is not None:
            return spec.height, spec.width
        return None

    def pixel_values(
        self, data: bytes, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """uint8 RGB rows [H, W, 3] (already resized and cropped) -> [3, H, W] in `dtype` on `device`."""
        height, width, channels = shape
        if channels != 3 or len(data) != height * width * 3:
            raise ValueError(
                f"image data of {len(data)} bytes does not hold RGB pixels of shape {tuple(shape)}"
            )
        pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)
        x = pixels.to(torch.float32)
        if self.do_rescale:  # transformers: float64 product, then float32
            x = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)
            x = (x - mean) / std
        return x.to(device=device, dtype=dtype)


def read_processor_files(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image processor settings, processor settings) from `folder`; empty dicts where absent."""
    processor = _read_json(folder / "processor_config.json")
    nested = processor.get("image_processor")
    if isinstance(nested, dict):
        return nested, processor
    return _read_json(folder / "preprocessor_config.json"), processor


def image_processor_from_config(config: dict[str, Any]) -> ImageProcessor:
    """An `ImageProcessor` from a CLIPImageProcessor-style config (CLIPImageProcessor's defaults for
    missing keys); a clear error for settings the core's Pillow path does not reproduce."""
    if config.get("do_pad"):
        raise UnsupportedModelError("image processors that pad images to a square (do_pad) are not supported")
    size = config.get("size", {"shortest_edge": 224})
    if isinstance(size, int):  # older configs: an int is the shortest edge (CLIP does not default to square)
        size = {"shortest_edge": size}
    if set(size) - {"shortest_edge", "height", "width"} or (
        "shortest_edge" not in size and not {"height", "width"} <= set(size)
    ):
        raise UnsupportedModelError(f"image processor size {size} is not supported")
    crop = config.get("crop_size", {"height": 224, "width": 224})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    shortest = size.get("shortest_edge")
    spec = ImageProcessing(
        do_convert_rgb=bool(config.get("do_convert_rgb", True)),
        do_resize=bool(config.get("do_resize", True)),
        shortest_edge=int(shortest) if shortest is not None else None,
        height=None if shortest is not None else int(size["height"]),
        width=None if shortest is not None else int(size["width"]),
        resample=int(config.get("resample", 3)),
        do_center_crop=bool(config.get("do_center_crop", True)),
        crop_height=int(crop["height"]),
        crop_width=int(crop["width"]),
    )
    mean, std = config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)
    return ImageProcessor(
        spec=spec,
        do_rescale=bool(config.get("do_rescale", True)),
        rescale_factor=float(config.get("rescale_factor", 1 / 255)),
        do_normalize=bool(config.get("do_normalize", True)),
        image_mean=_per_channel(mean, "image_mean"),
        image_std=_per_channel(std, "image_std"),
    )


def _per_channel(value: float | list[float], name: str) -> tuple[float, ...]:
    values = (value,) * 3 if isinstance(value, int | float) else tuple(value)
    if len(values) != 3:
        raise UnsupportedModelError(f"{name} must give one number or three (RGB), got {value!r}")
    return tuple(float(v) for v in values)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
