"""Response bodies of the pooling endpoints, as msgspec Structs, in vLLM's wire shapes.

Whole responses carry every key, with nulls, as vLLM's do. Rerank answers are vLLM's (Jina's)
shape plus Cohere's `meta`, so Cohere clients parse them too; `document` is left out when the
request said `return_documents: false`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from protocol.responses import UsageInfo

Vector = list[float]


class EmbeddingResponseData(msgspec.Struct, kw_only=True):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[Any] | str  # floats, or base64 of the packed vector


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    id: str  # "embd-..."
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingResponseData]
    usage: UsageInfo


class PoolingResponseData(msgspec.Struct, kw_only=True):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[Any] | str  # one vector, rows of floats per token, or base64


class PoolingResponse(msgspec.Struct, kw_only=True):
    id: str  # "pool-..."
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class ClassificationData(msgspec.Struct, kw_only=True):
    index: int
    label: str | None  # the model's id2label of the top class (None: the model names none)
    probs: Vector
    num_classes: int


class ClassificationResponse(msgspec.Struct, kw_only=True):
    id: str  # "classify-..."
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class ScoreResponseData(msgspec.Struct, kw_only=True):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(msgspec.Struct, kw_only=True):
    id: str  # "score-..."
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo


class RerankDocument(msgspec.Struct, kw_only=True):
    text: str


class RerankResult(msgspec.Struct, kw_only=True):
    index: int  # the document's position in the request
    document: RerankDocument | UnsetType = UNSET  # left out with return_documents: false
    relevance_score: float


class RerankUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class ApiVersion(msgspec.Struct, kw_only=True):
    version: str = "2"


class BilledUnits(msgspec.Struct, kw_only=True):
    search_units: int = 1


class RerankMeta(msgspec.Struct, kw_only=True):
    """Cohere's `meta`, which its clients expect on every rerank response."""

    api_version: ApiVersion = msgspec.field(default_factory=ApiVersion)
    billed_units: BilledUnits = msgspec.field(default_factory=BilledUnits)


class RerankResponse(msgspec.Struct, kw_only=True):
    id: str  # "rerank-..."
    model: str
    usage: RerankUsage
    results: list[RerankResult]
    meta: RerankMeta = msgspec.field(default_factory=RerankMeta)


def pooling_usage(prompt_tokens: int) -> UsageInfo:
    """Pooling uses no completion tokens: `{prompt_tokens, total_tokens, completion_tokens: 0, ...}`."""
    return UsageInfo(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


# ---- encoding_format "bytes": a raw body and its description in a `metadata` header ----


class BytesItem(msgspec.Struct, kw_only=True):
    """Where one output lies in the body: `body[start:end]`, of `shape`, in `embed_dtype`/`endianness`."""

    index: int
    embed_dtype: str
    endianness: str
    start: int
    end: int
    shape: list[int]


class BytesUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class BytesMetadata(msgspec.Struct, kw_only=True):
    id: str
    created: int
    model: str
    data: list[BytesItem]
    usage: BytesUsage
