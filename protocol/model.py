"""Static facts about a served model that the protocol core needs (no weights, no engine)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from protocol.tokenizer import Tokenizer

Task = Literal["generate", "embed", "score"]


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
    task: Task = "generate"
    generation_defaults: dict[str, Any] = msgspec.field(default_factory=dict)
    created: int = 0

    @property
    def name(self) -> str:
        return self.names[0]
