"""Response bodies and stream chunks of the OpenAI-compatible endpoints, as msgspec Structs.

Serialization follows vLLM's wire format (reference/openai-server.md §2 and §8):

- Whole responses (`ChatCompletionResponse`, `CompletionResponse`, ...) carry every key, with nulls.
- Chat stream chunks carry only the keys that were set (vLLM: `exclude_unset=True`). Their optional
  fields default to `msgspec.UNSET`, which msgspec never writes; set a field to `None` to send a
  `null`. A stream choice sends `"logprobs": null, "finish_reason": null` by default, as vLLM does.
- Completion stream chunks carry every key, with nulls (`exclude_unset=False`).
- The final usage chunk of a stream is `{id, object, created, model, "choices": [], "usage": {...}}`
  with nulls dropped: build it with `usage_chunk`.

Logprobs are clamped to >= -9999.0 as vLLM does (`clamp_logprob`), since JSON has no -inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from protocol.model import ServedModel

MIN_LOGPROB = -9999.0


def clamp_logprob(logprob: float) -> float:
    """-inf (and anything below) becomes -9999.0, the floor vLLM reports."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB


# ---- shared ----


class PromptTokenUsageInfo(msgspec.Struct, kw_only=True):
    cached_tokens: int | None = None


class UsageInfo(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: PromptTokenUsageInfo | None | UnsetType = None


class Logprob(msgspec.Struct, kw_only=True):
    """One entry of `prompt_logprobs` (a dict token id -> Logprob per prompt position)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# ---- chat ----


class ChatCompletionLogProb(msgspec.Struct, kw_only=True):
    token: str
    logprob: float = MIN_LOGPROB
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(msgspec.Struct, kw_only=True):
    token: str
    logprob: float = MIN_LOGPROB
    bytes: list[int] | None = None
    top_logprobs: list[ChatCompletionLogProb] = msgspec.field(default_factory=list)


class ChatCompletionLogProbs(msgspec.Struct, kw_only=True):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | None = None
    refusal: str | None = None
    annotations: Any = None
    audio: Any = None
    function_call: FunctionCall | None = None
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    reasoning: str | None = None
    reasoning_content: str | None = None  # deprecated copy of `reasoning`


class ChatCompletionResponseChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict[str, Any] | None = None


class DeltaFunctionCall(msgspec.Struct, kw_only=True):
    name: str | None | UnsetType = UNSET
    arguments: str | None | UnsetType = UNSET


class DeltaToolCall(msgspec.Struct, kw_only=True):
    index: int
    id: str | None | UnsetType = UNSET
    type: Literal["function"] | None | UnsetType = UNSET
    function: DeltaFunctionCall | None | UnsetType = UNSET


class DeltaMessage(msgspec.Struct, kw_only=True):
    role: str | None | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    reasoning: str | None | UnsetType = UNSET
    reasoning_content: str | None | UnsetType = UNSET
    tool_calls: list[DeltaToolCall] | UnsetType = UNSET


class ChatCompletionResponseStreamChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None | UnsetType = None  # vLLM always sends these two
    finish_reason: str | None | UnsetType = None
    stop_reason: int | str | None | UnsetType = UNSET
    token_ids: list[int] | None | UnsetType = UNSET


class ChatCompletionStreamResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None | UnsetType = UNSET
    prompt_token_ids: list[int] | None | UnsetType = UNSET


# ---- completions ----


class CompletionLogProbs(msgspec.Struct, kw_only=True):
    text_offset: list[int] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    tokens: list[str] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)


class CompletionResponseChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    kv_transfer_params: dict[str, Any] | None = None


class CompletionResponseStreamChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionStreamResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ---- the final usage chunk of a stream ----


class UsageChunk(msgspec.Struct, kw_only=True):
    """`{..., "choices": [], "usage": {...}}`: vLLM serializes it with nulls dropped."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any] = msgspec.field(default_factory=list)
    usage: UsageInfo


def usage_chunk(
    id: str,
    object: Literal["chat.completion.chunk", "text_completion"],
    created: int,
    model: str,
    usage: UsageInfo,
) -> UsageChunk:
    """The last stream chunk with usage; a null `prompt_tokens_details`/`completion_tokens` is left out."""
    return UsageChunk(id=id, object=object, created=created, model=model, usage=_without_nulls(usage))


def _without_nulls(usage: UsageInfo) -> UsageInfo:
    return msgspec.structs.replace(
        usage,
        completion_tokens=UNSET if usage.completion_tokens is None else usage.completion_tokens,
        prompt_tokens_details=UNSET if usage.prompt_tokens_details is None else usage.prompt_tokens_details,
    )


# ---- models, tokenize, detokenize ----


class ModelPermission(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int = 0
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sansllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = msgspec.field(default_factory=list)


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard] = msgspec.field(default_factory=list)


def model_list(models: Sequence[ServedModel]) -> ModelList:
    """GET /v1/models: one card per served model, named by its first name (as vLLM lists them), then
    its LoRA adapters' cards (`parent`: the base, `root`: the adapter's folder, as vLLM)."""
    cards = []
    for model in models:
        cards.append(_card(model))
        cards.extend(_card(model.adapter(name)) for name in model.lora_modules)
    return ModelList(data=cards)


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(
        id=model.name,
        created=model.created,
        root=model.root,
        parent=model.parent,
        max_model_len=None if model.lora_name else model.max_model_len,
        permission=[ModelPermission(id=f"modelperm-{model.name}", created=model.created)],
    )


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


# ---- encoding ----

_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    """JSON bytes of a response struct (UNSET fields left out)."""
    return _encoder.encode(value)
