"""The model registry: which HF architecture runs on which of our implementations, and what it serves.

Two kinds of model run in the engine:

- **decoders** (Llama, Mistral, Qwen2, SmolLM, Gemma 3; GGUF files are decoders) run causally over the
  paged KV cache, scheduled in chunks beside other sequences. They generate text; converted with
  `convert="embed"` (vLLM's `--convert embed`) they serve embeddings instead, pooled from the last
  prompt token's hidden state (vLLM's default for decoder embedding models). Vision-language models
  (LLaVA) are decoders too: their images enter as input embeddings of placeholder tokens; they
  generate, or with `convert="embed"` embed chats that hold images, pooled the same way (as vLLM
  serves vision-language embedding models);
- **encoders** (BERT, RoBERTa, XLM-R) attend both ways over a whole input, so they never chunk and
  keep no KV cache. The base models serve embeddings; `*ForSequenceClassification` models serve
  `classify`, and with a single output (a cross-encoder) also `score` for /score and /rerank.

Speech-to-text models (Whisper) run as decoders too, serving `transcription` only: their decoder
is scheduled on the paged KV cache like any other, and cross-attends to one audio window per
request, encoded once (engine.models.whisper).

Tasks use vLLM's names (see `protocol.model.Task`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from engine.model_config import MULTIMODAL_ARCHITECTURES, SPEECH_ARCHITECTURES, UnsupportedModelError
from engine.model_config import SUPPORTED_ARCHITECTURES as DECODER_ARCHITECTURES
from engine.models.bert import BASE_BY_MODEL_TYPE
from engine.models.bert import ENCODER_ARCHITECTURES as _ENCODERS
from engine.models.gemma3 import Gemma3ForCausalLM
from engine.models.llama import LlamaForCausalLM

ModelKind = Literal["decoder", "encoder"]
Convert = Literal["auto", "embed"]

# The encoders of engine/models/bert.py, split by whether they carry a classification head
ENCODER_ARCHITECTURES = tuple(name for name, (_, head) in _ENCODERS.items() if not head)
CLASSIFIER_ARCHITECTURES = tuple(name for name, (_, head) in _ENCODERS.items() if head)


@dataclass(frozen=True)
class ArchitectureSupport:
    """How the engine runs one model: its architecture, kind and the tasks it serves."""

    architecture: str
    kind: ModelKind
    tasks: frozenset[str]

    @property
    def generates(self) -> bool:
        return "generate" in self.tasks


def decoder_class(architecture: str) -> type[LlamaForCausalLM]:
    """Our implementation of a decoder architecture (the Llama family shares one)."""
    if architecture not in DECODER_ARCHITECTURES:
        raise UnsupportedModelError(f"{architecture} is not a decoder architecture")
    return Gemma3ForCausalLM if architecture == "Gemma3ForCausalLM" else LlamaForCausalLM


def all_architectures() -> tuple[str, ...]:
    decoders = (*DECODER_ARCHITECTURES, *MULTIMODAL_ARCHITECTURES, *SPEECH_ARCHITECTURES)
    return (*decoders, *ENCODER_ARCHITECTURES, *CLASSIFIER_ARCHITECTURES)


def encoder_architecture(config: dict[str, Any]) -> str | None:
    """The encoder architecture an HF config.json describes, or None when it is not an encoder."""
    for name in config.get("architectures") or ():
        if name in ENCODER_ARCHITECTURES or name in CLASSIFIER_ARCHITECTURES:
            return name
    decoders = (*DECODER_ARCHITECTURES, *MULTIMODAL_ARCHITECTURES, *SPEECH_ARCHITECTURES)
    if not any(name in decoders for name in config.get("architectures") or ()):
        return BASE_BY_MODEL_TYPE.get(config.get("model_type", ""))
    return None


def architecture_support(architecture: str, convert: Convert = "auto", num_labels: int = 0) -> ArchitectureSupport:
    """What `architecture` serves, given the `convert` option."""
    if convert not in ("auto", "embed"):
        raise ValueError(f"unknown convert option {convert!r}; choose auto or embed")
    if architecture in DECODER_ARCHITECTURES or architecture in MULTIMODAL_ARCHITECTURES:
        if convert == "embed":
            return ArchitectureSupport(architecture, "decoder", frozenset({"embed"}))
        return ArchitectureSupport(architecture, "decoder", frozenset({"generate"}))
    if architecture in SPEECH_ARCHITECTURES:
        if convert == "embed":
            raise UnsupportedModelError(f"{architecture} is a speech-to-text model; it cannot serve embeddings")
        return ArchitectureSupport(architecture, "decoder", frozenset({"transcription"}))
    if architecture in ENCODER_ARCHITECTURES:
        return ArchitectureSupport(architecture, "encoder", frozenset({"embed", "token_embed"}))
    if architecture in CLASSIFIER_ARCHITECTURES:
        if convert == "embed":
            return ArchitectureSupport(architecture, "encoder", frozenset({"embed", "token_embed"}))
        tasks = {"classify"} | ({"score"} if num_labels == 1 else set())
        return ArchitectureSupport(architecture, "encoder", frozenset(tasks))
    supported = ", ".join(all_architectures())
    raise UnsupportedModelError(
        f"architecture {architecture} is not supported; supported architectures: {supported} "
        "(SmolLM models are Llama)"
    )
