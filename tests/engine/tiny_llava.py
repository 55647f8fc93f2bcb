"""A tiny random LLaVA HF folder, as the hub's llava-hf checkpoints lay theirs out.

`build_llava` writes config.json (LlavaConfig: a CLIP vision tower of 32x32 images in 8x8 patches,
a two-layer Llama), safetensors weights from transformers' `save_pretrained`, the small trained
tokenizer of `tiny_models` plus a special "<image>" token, and a `LlavaProcessor` (CLIP image
processor settings, patch size, select strategy and a llava-1.5 style chat template that writes
"<image>" for image parts) saved with `save_pretrained`: processor_config.json and
chat_template.jinja. `rename_weights` turns the weight names transformers 5 saves into the other
layouts checkpoints have, and `legacy_processor_files` rewrites the processor files the older way
(preprocessor_config.json, chat_template.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from tests.engine.tiny_models import train_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
# llava-1.5's template (llava-hf), less its `generation` tags: images first, then the text, per message
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# non-default normalisation, so a test can tell they are read from the folder
IMAGE_MEAN, IMAGE_STD = [0.5, 0.45, 0.4], [0.25, 0.3, 0.35]

_LAYOUTS = {  # layout -> {name prefix as transformers 5 saves it: the layout's}
    "modules": {
        "vision_tower.": "model.vision_tower.",
        "multi_modal_projector.": "model.multi_modal_projector.",
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
    },
    "hub": {
        "vision_tower.": "vision_tower.vision_model.",
        "multi_modal_projector.": "multi_modal_projector.",
        "language_model.": "language_model.",
    },
}


def build_llava(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random LLaVA model to `folder` and return the folder.

    `overrides` go to `LlavaConfig` (e.g. `vision_feature_layer=[-3, -1]`,
    `vision_feature_select_strategy="full"`, `projector_hidden_act`), except `vision_config` and
    `text_config`, dicts merged into the tiny CLIP and Llama shapes. The image processor resizes the
    short side to 32 and center-crops 32x32 (bicubic), with `IMAGE_MEAN` / `IMAGE_STD`. Every weight,
    norms and biases included, is drawn from N(0, 0.3) with `seed`, so no layer is an identity.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tokenizer.chat_template = LLAVA_TEMPLATE  # the processor's; the tokenizer is saved with it too
    vision: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_act": "quick_gelu",
        "projection_dim": 16,
    }
    vision.update(overrides.pop("vision_config", {}))
    text: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    text.update(overrides.pop("text_config", {}))
    settings: dict[str, Any] = {
        "image_token_index": image_token_id,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
    }
    settings.update(overrides)
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    settings["image_seq_length"] = patches + (settings["vision_feature_select_strategy"] == "full")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), **settings
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # the default init zeroes biases and sets norms to one: randomise everything
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision["image_size"]},
        crop_size={"height": vision["image_size"], "width": vision["image_size"]},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=settings["vision_feature_select_strategy"],
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(folder)
    return folder


def rename_weights(folder: Path, layout: str) -> Path:
    """Rename the weights of a `build_llava` folder in place to another checkpoint layout.

    transformers 5 saves `vision_tower.`, `multi_modal_projector.`, `language_model.model.` and
    `language_model.lm_head.`. `layout` "modules": its module names (`model.vision_tower.`,
    `model.multi_modal_projector.`, `model.language_model.`, `lm_head.`), which checkpoints written
    by other tools carry; "hub": the llava-hf checkpoints written by transformers 4, whose CLIP tower
    nests one level deeper (`vision_tower.vision_model.`)."""
    prefixes = _LAYOUTS[layout]
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    renamed = {_renamed(name, prefixes): tensor for name, tensor in tensors.items()}
    save_file(renamed, weights, metadata={"format": "pt"})
    return folder


def legacy_processor_files(folder: Path) -> Path:
    """Rewrite the processor files of a `build_llava` folder as older hub checkpoints have them: the
    image processor alone in preprocessor_config.json, the chat template in chat_template.json."""
    processor = json.loads((folder / "processor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(processor.pop("image_processor"), indent=2))
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    template = folder / "chat_template.jinja"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    return folder


def _renamed(name: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if name.startswith(old):
            return new + name.removeprefix(old)
    raise AssertionError(f"unexpected tensor {name}")
