"""Our LLaVA (engine.models.llava), loaded from tiny random HF folders, gives transformers' results.

For a table of configs (feature layer -2 or a list, "default" or "full" selection) and one or two
different images: image features equal `get_image_features`, prompt logits over input ids holding
the expanded image placeholders equal transformers' forward, and greedy generation is token for
token the same. Our side runs the way the engine's runner does: the prompt goes through the paged
KV cache (in chunks, beside other sequences) and the placeholder rows' input embeddings are
replaced by the images' features (`forward(..., embeds=(rows, values))`).

Tolerances, all float32: image features 1e-5 absolute (observed: 0, the same ops in the same
order); logits 1e-4 absolute on values of magnitude ~3 (observed ~2e-6: attention's summation
order and the fused residual adds differ, as in test_hf_models); pixel values 1e-6 (observed: 0).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor
from transformers import LlavaForConditionalGeneration as HFLlava

from engine.attention import SequenceSpan, build_step
from engine.loader import LoadedModel, load_model
from engine.model_config import ModelConfig, UnsupportedModelError
from engine.model_files import resolve_model
from engine.models.llava import LlavaConfig, LlavaForConditionalGeneration
from engine.registry import architecture_support
from protocol.media.spec import ImageProcessing
from tests.engine.paged import PagedRunner
from tests.engine.tiny_llava import (
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    IMAGE_TOKEN,
    build_llava,
    legacy_processor_files,
    rename_weights,
)

FEATURE_ATOL, LOGITS_ATOL, PIXEL_ATOL = 1e-5, 1e-4, 1e-6
CASES: dict[str, dict[str, Any]] = {
    "layer-2-default": {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"},
    "layers-default": {"vision_feature_layer": [-3, -1], "vision_feature_select_strategy": "default"},
    "layer-2-full": {"vision_feature_layer": -2, "vision_feature_select_strategy": "full"},
    "layers-full": {"vision_feature_layer": [0, -2], "vision_feature_select_strategy": "full"},
}


@dataclass
class Case:
    folder: Path
    settings: dict[str, Any]
    ours: LoadedModel
    hf: HFLlava

    @property
    def model(self) -> LlavaForConditionalGeneration:
        assert isinstance(self.ours.model, LlavaForConditionalGeneration)
        return self.ours.model

    def prompt(self, images: int) -> list[int]:
        """A prompt with `images` expanded image runs between pieces of text."""
        encode = self.ours.tokenizer.encode
        placeholder = [self.model.llava_config.image_token_id] * self.model.image_tokens
        ids = encode("USER: ")
        for i in range(images):
            ids += placeholder + encode(f"\nPicture {i}. ")
        return ids + encode("What is the capital of France? ASSISTANT:")


def load(folder: Path) -> LoadedModel:
    return load_model(resolve_model(str(folder)), dtype="float32", progress=False)


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    settings = CASES[request.param]
    folder = build_llava(tmp_path_factory.mktemp("llava") / request.param, **settings)
    return Case(folder, settings, load(folder), HFLlava.from_pretrained(folder, dtype=torch.float32).eval())


def pixels(images: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


class VisionRunner(PagedRunner):
    """Feeds prompts with expanded image placeholders through a paged cache, replacing each
    placeholder row's input embedding with its image feature, as the engine's runner does."""

    def __init__(self, model: LlavaForConditionalGeneration, max_seqs: int = 2):
        super().__init__(model, max_len=256, max_seqs=max_seqs)  # type: ignore[arg-type]
        self.llava = model
        self.tokens: dict[str, list[int]] = {}
        self.features: dict[str, torch.Tensor] = {}

    def add(self, key: str, ids: list[int], images: torch.Tensor | None) -> None:
        self.tokens[key] = list(ids)
        if images is not None:
            with torch.inference_mode():
                self.features[key] = self.llava.embed_images(images).flatten(0, 1)

    def step(self, steps: list[tuple[str, int]]) -> torch.Tensor:
        """Logits of the next `n` tokens of each (sequence, n), all in one flat batch."""
        spans, rows, values, base = [], [], [], 0
        image_id = self.llava.llava_config.image_token_id
        for key, n in steps:
            start = self.lengths.setdefault(key, 0)
            first = list(self.lengths).index(key) * self.blocks_per_seq
            ids = self.tokens[key][start : start + n]
            spans.append(SequenceSpan(ids, start, range(first, first + self.blocks_per_seq)))
            self.lengths[key] = start + n
            is_image = torch.tensor(self.tokens[key]) == image_id
            feature = is_image.cumsum(0) - 1  # which image feature each placeholder takes
            for position in range(start, start + n):
                if is_image[position]:
                    rows.append(base + position - start)
                    values.append(self.features[key][feature[position]])
            base += n
        inputs = build_step(self.cache, spans)
        embeds = (torch.tensor(rows), torch.stack(values)) if rows else None
        with torch.inference_mode():
            hidden = self.llava(inputs.input_ids, inputs.positions, inputs.meta, embeds)
            return self.llava.compute_logits(hidden)


def our_logits(
    model: LlavaForConditionalGeneration, ids: list[int], images: torch.Tensor, chunks: list[int]
) -> torch.Tensor:
    runner = VisionRunner(model, max_seqs=1)
    runner.add("seq", ids, images)
    return torch.cat([runner.step([("seq", n)]) for n in chunks])


def hf_logits(hf: HFLlava, ids: list[int], images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(input_ids=torch.tensor([ids]), pixel_values=images).logits[0]


# ---- against transformers ----


@pytest.mark.parametrize("images", [1, 2])
def test_image_features_equal_transformers(case: Case, images: int):
    batch = pixels(images, seed=images)
    with torch.inference_mode():
        out = case.hf.get_image_features(
            pixel_values=batch,
            vision_feature_layer=case.settings["vision_feature_layer"],
            vision_feature_select_strategy=case.settings["vision_feature_select_strategy"],
        )
        ours = case.model.embed_images(batch)
    expected = torch.stack(list(out.pooler_output))
    assert ours.shape == (images, case.model.image_tokens, 64)
    torch.testing.assert_close(ours, expected, atol=FEATURE_ATOL, rtol=0)
    assert not torch.allclose(ours[0], ours[-1]) or images == 1  # different images, different features


@pytest.mark.parametrize("images", [1, 2])
def test_prompt_logits_equal_transformers(case: Case, images: int):
    ids = case.prompt(images)
    batch = pixels(images, seed=10 + images)
    expected = hf_logits(case.hf, ids, batch)
    torch.testing.assert_close(
        our_logits(case.model, ids, batch, [len(ids)]), expected, atol=LOGITS_ATOL, rtol=0
    )
    # the images matter: other pixels give other logits after the first placeholder
    other = hf_logits(case.hf, ids, pixels(images, seed=99))
    assert (other - expected).abs().max() > 100 * LOGITS_ATOL


def test_chunks_that_split_an_image_run_give_the_same_logits(case: Case):
    """Chunked prefill may cut an image's placeholder run anywhere; decode steps follow."""
    ids = case.prompt(2)
    batch = pixels(2, seed=3)
    first_image = ids.index(case.model.llava_config.image_token_id)
    cuts = [
        first_image + 3,
        7,
        case.model.image_tokens,
    ]  # into the first run, within it, across into the second
    chunks = [*cuts, len(ids) - sum(cuts) - 3, 1, 1, 1]
    ours = our_logits(case.model, ids, batch, chunks)
    torch.testing.assert_close(ours, hf_logits(case.hf, ids, batch), atol=LOGITS_ATOL, rtol=0)


def test_prompts_with_different_images_in_one_batch_do_not_see_each_other(case: Case):
    a, b = case.prompt(1), case.prompt(2)
    image_a, images_b = pixels(1, seed=5), pixels(2, seed=6)
    runner = VisionRunner(case.model)
    runner.add("a", a, image_a)
    runner.add("b", b, images_b)
    logits = runner.step([("a", len(a)), ("b", len(b))])
    torch.testing.assert_close(logits[: len(a)], hf_logits(case.hf, a, image_a), atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits[len(a) :], hf_logits(case.hf, b, images_b), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("images", [1, 2])
def test_greedy_generation_equals_transformers(case: Case, images: int):
    ids, batch, new = case.prompt(images), pixels(images, seed=20 + images), 12
    with torch.inference_mode():
        out = case.hf.generate(
            input_ids=torch.tensor([ids]), pixel_values=batch, max_new_tokens=new, do_sample=False
        )
    expected = out[0, len(ids) :].tolist()
    eos = set(case.ours.tokenizer.eos_token_ids)
    runner = VisionRunner(case.model, max_seqs=1)
    runner.add("seq", ids, batch)
    tokens: list[int] = []
    logits = runner.step([("seq", len(ids))])[-1]
    while len(tokens) < new:
        tokens.append(int(logits.argmax()))
        if tokens[-1] in eos:
            break
        runner.tokens["seq"].append(tokens[-1])
        logits = runner.step([("seq", 1)])[-1]
    assert tokens == expected
    assert len(set(tokens)) > 1  # a real continuation, not one token repeated


def test_the_processor_expands_images_as_the_spec_says(case: Case):
    """transformers' LlavaProcessor turns "<image>" into the spec's number of placeholder ids, and its
    pixel values through our model give its logits."""
    processor = AutoProcessor.from_pretrained(case.folder)
    image = random_image(45, 61, seed=1)
    text = f"USER: {IMAGE_TOKEN}\nWhat is this? ASSISTANT:"
    inputs = processor(images=[image], text=text, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    spec = case.ours.multimodal
    assert spec is not None
    assert ids.count(spec.image_token_id) == spec.image_tokens == case.model.image_tokens
    data, shape = core_resize_and_crop(image, spec.image)
    ours = case.model.pixel_values(data, shape).unsqueeze(0)
    torch.testing.assert_close(ours, inputs["pixel_values"], atol=PIXEL_ATOL, rtol=0)
    torch.testing.assert_close(
        our_logits(case.model, ids, ours, [len(ids)]),
        hf_logits(case.hf, ids, inputs["pixel_values"]),
        atol=LOGITS_ATOL,
        rtol=0,
    )


# ---- image preprocessing ----


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def core_resize_and_crop(image: Image.Image, spec: ImageProcessing) -> tuple[bytes, tuple[int, int, int]]:
    """What the protocol core does before the engine: transformers' shortest-edge size (its rounding:
    int() of the long side), a Pillow resize, a center crop at ((H - h) // 2, (W - w) // 2)."""
    assert spec.shortest_edge is not None
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize((new_w, new_h), resample=Image.Resampling(spec.resample))
    top, left = (new_h - spec.crop_height) // 2, (new_w - spec.crop_width) // 2
    image = image.crop((left, top, left + spec.crop_width, top + spec.crop_height))
    return np.asarray(image).tobytes(), (spec.crop_height, spec.crop_width, 3)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.mark.parametrize(("height", "width"), [(45, 61), (61, 45), (32, 32), (100, 40), (33, 250)])
def test_pixel_values_equal_the_clip_image_processor(tiny_llava: Path, height: int, width: int):
    loaded = load(tiny_llava)
    hf_processor = AutoProcessor.from_pretrained(tiny_llava).image_processor
    assert type(hf_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision here
    image = random_image(height, width, seed=height * width)
    expected = hf_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    spec = loaded.multimodal.image if loaded.multimodal else None
    assert spec is not None
    ours = loaded.model.pixel_values(*core_resize_and_crop(image, spec))
    assert ours.dtype == torch.float32 and ours.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(ours, expected, atol=PIXEL_ATOL, rtol=0)


def test_pixel_values_refuse_data_of_the_wrong_size(tiny_llava: Path):
    model = load(tiny_llava).model
    with pytest.raises(ValueError, match="does not hold RGB pixels"):
        model.pixel_values(bytes(32 * 32 * 3 - 1), (32, 32, 3))


# ---- loading ----


def test_the_loader_describes_the_model_for_the_server(tiny_llava: Path):
    loaded = load(tiny_llava)
    spec = loaded.multimodal
    assert spec is not None
    assert spec.modalities == frozenset({"image"})
    assert spec.image_token == IMAGE_TOKEN
    assert spec.image_token_id == loaded.tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)[0]
    assert spec.image_tokens == (IMAGE_SIZE // 8) ** 2  # "default": the class token's feature dropped
    assert spec.image == ImageProcessing(
        shortest_edge=IMAGE_SIZE,
        resample=3,
        do_center_crop=True,
        crop_height=IMAGE_SIZE,
        crop_width=IMAGE_SIZE,
    )
    assert loaded.model.processor.image_mean == pytest.approx(IMAGE_MEAN)
    assert loaded.model.processor.image_std == pytest.approx(IMAGE_STD)
    assert loaded.spec is not None and loaded.spec.kind == "decoder" and loaded.spec.tasks == {"generate"}
    assert isinstance(loaded.config, ModelConfig) and loaded.model.config is loaded.config
    assert loaded.config.architecture == "LlavaForConditionalGeneration"
    assert (loaded.config.hidden_size, loaded.config.num_hidden_layers) == (64, 2)
    # feature layer -2 of 3: the last layer is never run, so it is not built
    assert len(loaded.model.vision_tower.encoder.layers) == 2
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    template = loaded.tokenizer.hf.apply_chat_template(
        messages, chat_template=loaded.tokenizer.chat_template, tokenize=False, add_generation_prompt=True
    )
    assert template == "USER: <image>\nHi? ASSISTANT:"


@pytest.mark.parametrize("layout", ["modules", "hub"])
def test_every_weight_layout_loads_the_same_model(tiny_llava: Path, tmp_path: Path, layout: str):
    """transformers 5's saved names (the fixture), its module names, and transformers 4's hub names."""
    folder = rename_weights(Path(shutil.copytree(tiny_llava, tmp_path / layout)), layout)
    names = load_file(folder / "model.safetensors")
    expected = {
        "modules": ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", "lm_head.weight"),
        "hub": ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "language_model.lm_head.weight"),
    }[layout]
    assert set(expected) <= set(names)
    torch.testing.assert_close(case_logits(load(folder)), case_logits(load(tiny_llava)), atol=0, rtol=0)


def test_older_processor_files_give_the_same_spec_and_template(tiny_llava: Path, tmp_path: Path):
    legacy = legacy_processor_files(Path(shutil.copytree(tiny_llava, tmp_path / "legacy")))
    assert not (legacy / "chat_template.jinja").exists() and (legacy / "preprocessor_config.json").exists()
    loaded, base = load(legacy), load(tiny_llava)
    assert loaded.multimodal == base.multimodal
    assert loaded.model.processor == base.model.processor
    assert loaded.tokenizer.chat_template == base.tokenizer.chat_template
    assert base.tokenizer.chat_template is not None and "<image>" in base.tokenizer.chat_template


def case_ids(loaded: LoadedModel) -> list[int]:
    """A short prompt with one image's placeholders."""
    model = loaded.model
    assert isinstance(model, LlavaForConditionalGeneration)
    placeholders = [model.llava_config.image_token_id] * model.image_tokens
    return loaded.tokenizer.encode("USER: ") + placeholders + loaded.tokenizer.encode(" Hi")


def case_logits(loaded: LoadedModel) -> torch.Tensor:
    ids = case_ids(loaded)
    return our_logits(loaded.model, ids, pixels(1, seed=7), [len(ids)])  # type: ignore[arg-type]


def edit_weights(folder: Path, drop: str | None = None, add: str | None = None) -> None:
    tensors = load_file(folder / "model.safetensors")
    if drop is not None:
        del tensors[drop]
    if add is not None:
        tensors[add] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (
            "vision_tower.encoder.layers.0.mlp.fc1.weight",
            "lacks tensors for: vision_tower.encoder.layers.0.mlp.fc1.weight",
        ),
        ("multi_modal_projector.linear_2.bias", "lacks tensors for: multi_modal_projector.linear_2.bias"),
        (
            "language_model.model.layers.1.mlp.down_proj.weight",
            "language model: model.layers.1.mlp.down_proj.weight",
        ),
        ("language_model.lm_head.weight", "language model: lm_head.weight"),
    ],
)
def test_a_missing_tensor_is_a_clear_error(tiny_llava: Path, tmp_path: Path, drop: str, message: str):
    folder = Path(shutil.copytree(tiny_llava, tmp_path / "broken"))
    edit_weights(folder, drop=drop)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load(folder)


@pytest.mark.parametrize(
    "add",
    ["vision_tower.encoder.layers.0.mlp.fc3.weight", "image_newline", "multi_modal_projector.norm.weight"],
)
def test_an_unknown_tensor_is_a_clear_error(tiny_llava: Path, tmp_path: Path, add: str):
    folder = Path(shutil.copytree(tiny_llava, tmp_path / "broken"))
    edit_weights(folder, add=add)
    with pytest.raises(
        ValueError, match=f"{add.replace('.', '[.]')}' has no place in LlavaForConditionalGeneration"
    ):
        load(folder)


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_additional_image_tokens": 0}, "expands an image into 15 tokens; the model makes 16"),
        (
            {"image_processor": {"crop_size": {"height": 24, "width": 24}}},
            r"makes \(24, 24\) images; the vision tower takes 32x32",
        ),
        ({"image_processor": {"do_center_crop": False}}, "variable-size"),
        ({"image_processor": {"do_pad": True}}, "pad images to a square"),
        ({"image_processor": {"size": {"longest_edge": 32}}}, "size .* is not supported"),
    ],
)
def test_processor_files_the_model_cannot_serve_are_refused(
    tiny_llava: Path, tmp_path: Path, changes, message
):
    folder = Path(shutil.copytree(tiny_llava, tmp_path / "odd"))
    edit_json(folder / "processor_config.json", **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        load(folder)


def test_a_folder_without_image_processor_settings_is_refused(tiny_llava: Path, tmp_path: Path):
    folder = Path(shutil.copytree(tiny_llava, tmp_path / "bare"))
    (folder / "processor_config.json").unlink()
    with pytest.raises(UnsupportedModelError, match="lacks the image processor's settings"):
        load(folder)


# ---- configs ----

LLAVA_15_CONFIG = {  # llava-hf/llava-1.5-7b-hf's config.json: transformers wrote only the non-defaults
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}


def test_a_sparse_hub_config_takes_transformers_defaults():
    config = LlavaConfig.from_hf(LLAVA_15_CONFIG)
    text = config.text
    assert text.architecture == "LlavaForConditionalGeneration"
    assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (32064, 4096, 11008)
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (32, 32, 32)
    assert (text.max_position_embeddings, text.rms_norm_eps, text.rope_theta) == (4096, 1e-5, 10000.0)
    assert text.eos_token_ids == (2,) and not text.tie_word_embeddings
    assert config.vision.hidden_act == "quick_gelu" and config.vision.layer_norm_eps == 1e-5
    assert config.feature_layers == (23,) and config.image_tokens == 576 and config.image_token_id == 32000
    assert ModelConfig.from_hf(LLAVA_15_CONFIG) == text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "vision tower 'siglip_vision_model'"),
        ({"vision_feature_select_strategy": "pooled"}, "strategy 'pooled'"),
        ({"vision_feature_layer": -26}, "out of range"),
        ({"projector_hidden_act": "swiglu"}, "activation 'swiglu'"),
        (
            {"text_config": {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}},
            "Gemma3ForCausalLM language model",
        ),
    ],
)
def test_configs_we_cannot_run_are_refused(changes: dict[str, Any], message: str):
    config = {**LLAVA_15_CONFIG, **changes}
    if "text_config" in changes:
        config["text_config"] = {
            **changes["text_config"],
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 100,
        }
    with pytest.raises(UnsupportedModelError, match=message):
        LlavaConfig.from_hf(config)


def test_the_registry_serves_llava_as_a_generating_decoder_or_converted_to_embed():
    support = architecture_support("LlavaForConditionalGeneration")
    assert support.kind == "decoder" and support.tasks == {"generate"}
    embed = architecture_support("LlavaForConditionalGeneration", "embed")
    assert embed.kind == "decoder" and embed.tasks == {"embed"}


def test_bfloat16_with_packed_weights_runs_close_to_float32(tiny_llava: Path):
    """The serving setup (`pack_weights` after loading) in bfloat16: images, placeholders and all.
    Tolerance 0.1 on logits of magnitude ~3 (observed 0.045: bfloat16 keeps 8 bits of mantissa)."""
    reference = load(tiny_llava)
    loaded = load_model(resolve_model(str(tiny_llava)), dtype="bfloat16", progress=False)
    loaded.model.pack_weights()
    model = loaded.model
    assert isinstance(model, LlavaForConditionalGeneration)
    image = random_image(40, 50, seed=4)
    assert loaded.multimodal is not None
    pixel_values = model.pixel_values(*core_resize_and_crop(image, loaded.multimodal.image))
    assert pixel_values.dtype == torch.bfloat16
    ids = case_ids(loaded)
    ours = our_logits(model, ids, pixel_values.unsqueeze(0), [len(ids)])
    expected = our_logits(reference.model, ids, pixel_values.float().unsqueeze(0), [len(ids)])
    torch.testing.assert_close(ours, expected, atol=0.1, rtol=0)
