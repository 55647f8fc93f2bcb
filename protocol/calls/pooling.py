"""POST /v1/embeddings, /pooling and /classify: one `Encode` per input, answered in vLLM's shapes.

Input i is engine request `f"{response_id}{engine_tag}-{i}"` (`encode_call`) and `data[i]` of the
response. The engine normalises, truncates to `dimensions` and applies the classifier's
activation; this module validates the request and shapes the answer: floats, base64
(`embed_dtype`, `endianness`), or `encoding_format: "bytes"` (a raw `application/octet-stream`
body described by a JSON `metadata` header, as vLLM sends it). Usage counts the prompt tokens of
every input the engine pooled.

A chat with images (a vision-language embedding model) is answered by a `MediaCall` first: it has
the images fetched and decoded, then builds the endpoint's `EncodeCall` with `Encode.media` set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from protocol.calls.base import CallIdentity, CallSettings, Headers
from protocol.calls.encode import EncodeCall, Reply, ReplyHead, encode_call, prompt_tokens
from protocol.calls.media import MediaCall
from protocol.calls.pooling_inputs import (
    CLASSIFICATION,
    EMBEDDING,
    ChatInput,
    EngineInput,
    chat_input,
    input_items,
    prompt_input,
)
from protocol.calls.prompt import ChatRenderer
from protocol.engine_api import MediaInput, Pooled, PoolingParams
from protocol.model import ServedModel
from protocol.pooling_requests import (
    ClassificationChatRequest,
    ClassificationRequest,
    EmbeddingChatRequest,
    EmbeddingRequest,
    PoolingRequest,
    activation_flag,
)
from protocol.pooling_responses import (
    BytesItem,
    BytesMetadata,
    BytesUsage,
    ClassificationData,
    ClassificationResponse,
    EmbeddingResponse,
    EmbeddingResponseData,
    PoolingResponse,
    PoolingResponseData,
)
from protocol.pooling_validation import pooling_params, pooling_task, require_api
from protocol.validation import check_priority
from protocol.vector_bytes import EmbedDType, Endianness, flatten, shape_of, to_base64, to_bytes

OCTET_STREAM: Headers = ((b"content-type", b"application/octet-stream"),)


def engine_inputs(
    request: EmbeddingRequest | PoolingRequest | ClassificationRequest,
    model: ServedModel,
    renderer: ChatRenderer,
    operation: str,
) -> list[EngineInput] | ChatInput:
    """The request's inputs as prompts: its chat rendered (with its media plan), or each of its
    `input`s."""
    if isinstance(request, EmbeddingChatRequest | ClassificationChatRequest):
        return chat_input(request, model, renderer, operation=operation)
    return [
        prompt_input(
            item,
            model,
            add_special_tokens=request.add_special_tokens,
            truncate_prompt_tokens=request.truncate_prompt_tokens,
            operation=operation,
        )
        for item in input_items(request.input)
    ]


def _call_for(
    inputs: list[EngineInput] | ChatInput,
    model: ServedModel,
    identity: CallIdentity,
    build: Callable[[list[EngineInput]], EncodeCall],
) -> EncodeCall | MediaCall:
    """The endpoint's call over `inputs`; for a chat with media parts, a `MediaCall` that has them
    fetched and decoded first (a bad part is a 400 before any engine work), then builds it."""
    if not isinstance(inputs, ChatInput):
        return build(inputs)
    plan = inputs.plan
    if plan is None:
        return build([inputs.prompt])
    prompt = inputs.prompt

    def with_media(media: tuple[MediaInput, ...]) -> EncodeCall:
        return build([replace(prompt, media=media)])

    return MediaCall(plan, with_media, model.engine_name, identity.headers)


# ---- /v1/embeddings and /pooling ----


@dataclass(frozen=True, slots=True)
class _VectorsReply:
    """The body of /v1/embeddings (`object: "embedding"`) or /pooling (`object: "pooling"`)."""

    head: ReplyHead
    kind: str  # "embedding" | "pooling"
    encoding_format: str
    embed_dtype: EmbedDType
    endianness: Endianness
    per_token: bool  # token_embed / token_classify: one row per prompt token

    def __call__(self, results: Sequence[Pooled]) -> Reply:
        outputs = [self._checked(result.data) for result in results]
        if self.encoding_format == "bytes":
            return self._bytes(outputs, results)
        values: list[list[Any] | str]
        if self.encoding_format == "base64":
            values = [to_base64(flatten(data), self.embed_dtype, self.endianness) for data in outputs]
        elif self.per_token:
            values = [[list(row) for row in data] for data in outputs]
        else:
            values = [list(data) for data in outputs]
        if self.kind == "embedding":
            embeddings = [EmbeddingResponseData(index=i, embedding=value) for i, value in enumerate(values)]
            return self.head.list_reply(EmbeddingResponse, embeddings, results)
        pooled = [PoolingResponseData(index=i, data=value) for i, value in enumerate(values)]
        return self.head.list_reply(PoolingResponse, pooled, results)

    def _checked(self, data: Sequence) -> Sequence:
        """The engine's output has the task's shape (a vector, or equal-length rows per token)."""
        if self.per_token:
            if not all(isinstance(row, tuple | list) for row in data) or len({len(row) for row in data}) > 1:
                raise TypeError("the engine's per-token output is not one row of floats per token")
        elif not all(isinstance(value, int | float) for value in data):
            raise TypeError("the engine's output is not a vector of floats")
        return data

    def _bytes(self, outputs: Sequence[Sequence], results: Sequence[Pooled]) -> Reply:
        chunks, items, offset = [], [], 0
        for index, data in enumerate(outputs):
            chunk = to_bytes(flatten(data), self.embed_dtype, self.endianness)
            items.append(
                BytesItem(
                    index=index,
                    embed_dtype=self.embed_dtype,
                    endianness=self.endianness,
                    start=offset,
                    end=offset + len(chunk),
                    shape=shape_of(data),
                )
            )
            chunks.append(chunk)
            offset += len(chunk)
        tokens = prompt_tokens(results)
        metadata = BytesMetadata(
            id=self.head.response_id,
            created=self.head.created,
            model=self.head.model,
            data=items,
            usage=BytesUsage(prompt_tokens=tokens, total_tokens=tokens),
        )
        # json.dumps escapes everything outside printable ASCII: always a valid header value
        header = json.dumps(msgspec.to_builtins(metadata)).encode("ascii")
        return Reply(OCTET_STREAM + ((b"metadata", header),), b"".join(chunks))


def build_embedding_call(
    request: EmbeddingRequest,
    model: ServedModel,
    renderer: ChatRenderer,
    settings: CallSettings,
    identity: CallIdentity,
) -> EncodeCall | MediaCall:
    """POST /v1/embeddings; raises `ProtocolError` for a bad request."""
    require_api(model, "Embeddings", "embed")
    check_priority(request.priority, settings.allow_priority)
    params = pooling_params(model, "embed", dimensions=request.dimensions, normalize=request.normalize)
    inputs = engine_inputs(request, model, renderer, EMBEDDING)
    return _call_for(
        inputs,
        model,
        identity,
        lambda prompts: _vectors_call(
            request, model, identity, prompts, params, kind="embedding", per_token=False
        ),
    )


def build_pooling_call(
    request: PoolingRequest,
    model: ServedModel,
    renderer: ChatRenderer,
    settings: CallSettings,
    identity: CallIdentity,
) -> EncodeCall | MediaCall:
    """POST /pooling: any pooling task the model serves; raises `ProtocolError` for a bad request."""
    require_api(model, "Pooling")
    check_priority(request.priority, settings.allow_priority)
    task = pooling_task(model, request.task)
    params = pooling_params(
        model,
        task,
        dimensions=request.dimensions,
        normalize=request.normalize,
        use_activation=activation_flag(request),
    )
    inputs = engine_inputs(request, model, renderer, EMBEDDING)
    per_token = task in ("token_embed", "token_classify")
    return _call_for(
        inputs,
        model,
        identity,
        lambda prompts: _vectors_call(
            request, model, identity, prompts, params, kind="pooling", per_token=per_token
        ),
    )


def _vectors_call(
    request: EmbeddingRequest | PoolingRequest,
    model: ServedModel,
    identity: CallIdentity,
    inputs: Sequence[EngineInput],
    params: PoolingParams,
    *,
    kind: str,
    per_token: bool,
) -> EncodeCall:
    """The call of /v1/embeddings (`kind="embedding"`, ids `embd-...`) or /pooling (`pool-...`)."""
    prefix = "embd" if kind == "embedding" else "pool"
    head = ReplyHead(identity.response_id(prefix), identity.created, model.name)
    reply = _VectorsReply(
        head,
        kind=kind,
        encoding_format=request.encoding_format,
        embed_dtype=request.embed_dtype,
        endianness=request.endianness,
        per_token=per_token,
    )
    return encode_call(head, identity, inputs, params, request.priority, reply)


# ---- /classify ----


@dataclass(frozen=True, slots=True)
class _ClassificationReply:
    head: ReplyHead
    id2label: dict[int, str]

    def __call__(self, results: Sequence[Pooled]) -> Reply:
        data = []
        for index, result in enumerate(results):
            probs = [float(value) for value in result.data]  # type: ignore[arg-type]
            if not probs:
                raise ValueError("the engine returned no class scores")
            top = max(range(len(probs)), key=probs.__getitem__)  # the first of equal maxima, as argmax
            data.append(
                ClassificationData(
                    index=index, label=self.id2label.get(top), probs=probs, num_classes=len(probs)
                )
            )
        return self.head.list_reply(ClassificationResponse, data, results)


def build_classification_call(
    request: ClassificationRequest,
    model: ServedModel,
    renderer: ChatRenderer,
    settings: CallSettings,
    identity: CallIdentity,
) -> EncodeCall | MediaCall:
    """POST /classify: label = the model's id2label of the top class; raises `ProtocolError`."""
    require_api(model, "Classification", "classify")
    check_priority(request.priority, settings.allow_priority)
    params = pooling_params(model, "classify", use_activation=activation_flag(request))
    inputs = engine_inputs(request, model, renderer, CLASSIFICATION)
    head = ReplyHead(identity.response_id("classify"), identity.created, model.name)
    id2label = dict(model.pooling.id2label) if model.pooling is not None else {}
    reply = _ClassificationReply(head, id2label)
    return _call_for(
        inputs, model, identity, lambda prompts: encode_call(head, identity, prompts, params, request.priority, reply)
    )
