"""What a multimodal model accepts and how its inputs are prepared: filled by the engine's loader
from the model's config.json and preprocessor_config.json (the core reads no files)."""

from __future__ import annotations

from typing import Literal

import msgspec

Modality = Literal["image", "audio", "video"]


class ImageProcessing(msgspec.Struct, frozen=True, kw_only=True):
    """The resize and crop of an HF CLIP-style image processor, done on 8-bit RGB with Pillow.

    Rescaling and normalisation (`image_mean`, `image_std`) happen in the engine, on tensors; the
    core hands it the cropped 8-bit pixels.
    """

    do_convert_rgb: bool = True
    do_resize: bool = True
    shortest_edge: int | None = 224  # `size: {"shortest_edge": n}`: the short side becomes n
    height: int | None = None  # `size: {"height", "width"}`: resized to exactly that
    width: int | None = None
    resample: int = 3  # PIL's filter number (3: bicubic)
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224


class MultimodalSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The media a model accepts, its placeholder token and how many positions an item takes."""

    modalities: frozenset[str]  # of `Modality`
    image_token: str = "<image>"  # what the chat template writes where an image goes
    image_token_id: int = -1
    image_tokens: int = 0  # positions one image fills in the prompt (fixed for LLaVA-1.5-style)
    image: ImageProcessing = ImageProcessing()
    embeds_hidden_size: int = 0  # columns of an `image_embeds` tensor (the language model's hidden size)
    audio_sample_rate: int = 16000


class SpeechSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A speech-to-text model (Whisper): its special tokens and limits, filled by the engine's loader.

    The core builds each 30 s window's decoder prompt from these (`<|startofprev|>` + prompt text,
    `<|startoftranscript|>`, the language, the task, `<|notimestamps|>` unless timestamps are asked
    for) and reads timestamps back from ids at or above `timestamp_begin` (0.02 s apart).
    """

    sample_rate: int = 16000
    window_seconds: float = 30.0
    max_target_tokens: int = 448  # the decoder's positions, prompt included
    start_of_transcript: int
    transcribe: int
    translate: int | None = None  # None: an English-only model, which cannot translate
    no_timestamps: int
    start_of_prev: int | None = None
    timestamp_begin: int  # the id of <|0.00|>
    end_of_text: int
    languages: dict[str, int] = msgspec.field(default_factory=dict)  # "en" -> the id of <|en|>; empty: English-only
