"""Static facts about a served model that the protocol core needs (no weights, no engine)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from protocol.media.spec import MultimodalSpec, SpeechSpec
from protocol.tokenizer import Tokenizer

# What a model can be asked to do. A generative model serves `generate`; a pooling model serves
# some of the pooling tasks (vLLM's names): `embed` (one vector per input: /v1/embeddings,
# /pooling, and /score and /rerank by cosine similarity), `classify` (a classification head:
# /classify, /pooling), `score` (a cross-encoder's head on a sentence pair: /score, /rerank),
# `token_embed` and `token_classify` (per-token outputs through /pooling).
Task = Literal["generate", "embed", "classify", "score", "token_embed", "token_classify", "transcription"]


class PoolingInfo(msgspec.Struct, kw_only=True, frozen=True):
    """What the API needs to know about a pooling model's outputs."""

    hidden_size: int  # the length of an embedding
    # Matryoshka models may be truncated to fewer `dimensions`: the sizes allowed (None: any size
    # up to hidden_size); models that are not Matryoshka refuse `dimensions`.
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None
    num_labels: int = 0  # classification head outputs (0: no head)
    id2label: dict[int, str] = msgspec.field(default_factory=dict)


class ServedModel(msgspec.Struct, kw_only=True):
    """One model as the API sees it.

    `names[0]` is reported in responses; any of `names` is accepted in a request's `model`.
    `generation_defaults` come from the model's generation_config (temperature, top_p, top_k,
    min_p, repetition_penalty, max_tokens) and fill fields a request leaves unset.
    """

    names: list[str]
    root: str
    tokenizer: Tokenizer
    max_model_len: int
    tasks: frozenset[str] = frozenset({"generate"})
    pooling: PoolingInfo | None = None
    generation_defaults: dict[str, Any] = msgspec.field(default_factory=dict)
    created: int = 0
    # tokenizer_config.json's settings and `tokenizer_class`, as JSON data collected when the model
    # loaded (the core reads no files); GET /tokenizer_info serves them. Empty: only what the
    # `tokenizer` object itself tells.
    tokenizer_config: dict[str, Any] = msgspec.field(default_factory=dict)
    # LoRA adapters served over this model (name -> folder), with --enable-lora; a request naming
    # one runs it on this model's engine. Changed at run time by /v1/load_lora_adapter.
    lora_modules: dict[str, str] = msgspec.field(default_factory=dict)
    lora_enabled: bool = False
    # set on an adapter's view of its base model (`adapter()`): the adapter and the base's name
    lora_name: str | None = None
    parent: str | None = None
    # the media a multimodal model accepts and how they are prepared (None: text only)
    multimodal: MultimodalSpec | None = None
    # a speech-to-text model's tokens and limits (task "transcription"; None: not one)
    speech: SpeechSpec | None = None

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def engine_name(self) -> str:
        """The served model whose engine runs this one (an adapter's base)."""
        return self.parent or self.name

    def adapter(self, name: str) -> ServedModel:
        """This model as adapter `name` shows it: named by the adapter, run by this model's engine."""
        return msgspec.structs.replace(
            self, names=[name], root=self.lora_modules[name], lora_name=name, parent=self.name, lora_modules={}
        )

    def supports(self, task: Task) -> bool:
        return task in self.tasks
