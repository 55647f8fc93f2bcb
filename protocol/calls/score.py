"""POST /score (/v1/score) and /rerank (/v1/rerank, /v2/rerank): relevance of text pairs.

Two ways to score, as vLLM chooses them by the model:

- a cross-encoder (`"score"` in the model's tasks) reads each (query, document) pair joined by
  the tokenizer (`Tokenizer.encode_pair`, with token type ids): one `Encode(task="score")` per
  pair, and the score is the head's output `data[0]`;
- an embedding model (`"embed"`, no `"score"`) embeds every distinct text once and the score is
  the cosine similarity of the two vectors, computed here in pure Python.

Texts pair 1:1, 1:N (one query against every document) or N:N. Rerank answers are sorted by score
(descending, ties in request order) and cut to `top_n`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from msgspec import UNSET

from protocol.calls.base import JSON_CONTENT_TYPE, CallIdentity, CallSettings
from protocol.calls.encode import EncodeCall, Reply, ReplyHead, encode_call, prompt_tokens
from protocol.calls.pooling_inputs import EMBEDDING, SCORE, EngineInput, pair_input, prompt_input
from protocol.engine_api import Pooled, PoolingParams
from protocol.model import ServedModel
from protocol.pooling_requests import RerankRequest, ScoreRequest, activation_flag
from protocol.pooling_responses import (
    RerankDocument,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreResponse,
    ScoreResponseData,
)
from protocol.pooling_validation import check_score_lengths, pooling_params, require_api
from protocol.responses import encode
from protocol.validation import check_priority

_COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


def cosine_similarity(a: Sequence[float], b: Sequence[float]) -> float:
    """a.b / (max(|a|, eps) * max(|b|, eps)), as torch computes it."""
    if len(a) != len(b):
        raise ValueError(f"cannot compare vectors of {len(a)} and {len(b)} dimensions")
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm_a = max(math.sqrt(math.fsum(x * x for x in a)), _COSINE_EPS)
    norm_b = max(math.sqrt(math.fsum(y * y for y in b)), _COSINE_EPS)
    return dot / (norm_a * norm_b)


@dataclass(frozen=True, slots=True)
class _Scorer:
    """How the results of a call's `Encode`s become one score per pair."""

    pairs: (
        tuple[tuple[int, int], ...] | None
    )  # embedding model: the two results compared; None: pair k = result k

    def scores(self, results: Sequence[Pooled]) -> list[float]:
        if self.pairs is None:
            return [_head_score(result) for result in results]
        return [
            cosine_similarity(_vector(results[first].data), _vector(results[second].data))
            for first, second in self.pairs
        ]


def _head_score(result: Pooled) -> float:
    if not result.data or not isinstance(result.data[0], int | float):
        raise ValueError("the engine's score is not a number")
    return float(result.data[0])  # type: ignore[arg-type]


def _vector(data: Sequence) -> list[float]:
    if not all(isinstance(value, int | float) for value in data):
        raise ValueError("the engine's embedding is not a vector of floats")
    return [float(value) for value in data]


def _plan(
    request: ScoreRequest | RerankRequest,
    texts_1: list[str],
    texts_2: list[str],
    model: ServedModel,
    *,
    operation: str,
    params: tuple[str, str],
) -> tuple[list[EngineInput], _Scorer, PoolingParams]:
    """The engine inputs, how to score their results, and the pooling params (after the checks)."""
    truncate_prompt_tokens = request.truncate_prompt_tokens
    use_activation = activation_flag(request)
    check_score_lengths(len(texts_1), len(texts_2), params)
    if len(texts_1) == 1:
        texts_1 = texts_1 * len(texts_2)
    if model.supports("score"):  # a cross-encoder: one joined input per pair
        pooling = pooling_params(model, "score", use_activation=use_activation)
        inputs = [
            pair_input(
                first,
                second,
                model,
                truncate_prompt_tokens=truncate_prompt_tokens,
                operation=operation,
                param=params[1],
            )
            for first, second in zip(texts_1, texts_2, strict=True)
        ]
        return inputs, _Scorer(None), pooling
    pooling = pooling_params(model, "embed", use_activation=use_activation)
    index: dict[str, int] = {}
    inputs = []
    pairs = []
    for first, second in zip(texts_1, texts_2, strict=True):
        positions = []
        for text, param in ((first, params[0]), (second, params[1])):
            if text not in index:
                index[text] = len(inputs)
                inputs.append(
                    prompt_input(
                        text,
                        model,
                        add_special_tokens=True,
                        truncate_prompt_tokens=truncate_prompt_tokens,
                        operation=operation,
                        param=param,
                    )
                )
            positions.append(index[text])
        pairs.append((positions[0], positions[1]))
    return inputs, _Scorer(tuple(pairs)), pooling


# ---- /score ----


@dataclass(frozen=True, slots=True)
class _ScoreReply:
    head: ReplyHead
    scorer: _Scorer

    def __call__(self, results: Sequence[Pooled]) -> Reply:
        scores = self.scorer.scores(results)
        data = [ScoreResponseData(index=i, score=score) for i, score in enumerate(scores)]
        return self.head.list_reply(ScoreResponse, data, results)


def build_score_call(
    request: ScoreRequest,
    model: ServedModel,
    settings: CallSettings,
    identity: CallIdentity,
) -> EncodeCall:
    """POST /score: one score per pair; raises `ProtocolError` for a bad request."""
    require_api(model, "Score", "score", "embed")
    check_priority(request.priority, settings.allow_priority)
    texts_1, texts_2, names = request.texts()
    inputs, scorer, params = _plan(request, texts_1, texts_2, model, operation=SCORE, params=names)
    head = ReplyHead(identity.response_id("score"), identity.created, model.name)
    return encode_call(head, identity, inputs, params, request.priority, _ScoreReply(head, scorer))


# ---- /rerank ----


@dataclass(frozen=True, slots=True)
class _RerankReply:
    head: ReplyHead  # its `created` is not part of a rerank answer
    scorer: _Scorer
    documents: tuple[str, ...]
    top_n: int  # 0: all
    return_documents: bool

    def __call__(self, results: Sequence[Pooled]) -> Reply:
        scores = self.scorer.scores(results)
        ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)  # stable: ties keep order
        if 0 < self.top_n < len(ranked):
            ranked = ranked[: self.top_n]
        tokens = prompt_tokens(results)
        body = RerankResponse(
            id=self.head.response_id,
            model=self.head.model,
            usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens),
            results=[
                RerankResult(
                    index=i,
                    document=RerankDocument(text=self.documents[i]) if self.return_documents else UNSET,
                    relevance_score=scores[i],
                )
                for i in ranked
            ],
        )
        return Reply(JSON_CONTENT_TYPE, encode(body))


def build_rerank_call(
    request: RerankRequest,
    model: ServedModel,
    settings: CallSettings,
    identity: CallIdentity,
) -> EncodeCall:
    """POST /rerank, /v1/rerank, /v2/rerank (Jina and Cohere shapes); raises `ProtocolError`."""
    require_api(model, "Rerank", "score", "embed")
    check_priority(request.priority, settings.allow_priority)
    documents = request.document_texts()
    inputs, scorer, params = _plan(
        request, [request.query], documents, model, operation=EMBEDDING, params=("query", "documents")
    )
    head = ReplyHead(identity.response_id("rerank"), identity.created, model.name)
    reply = _RerankReply(
        head,
        scorer,
        documents=tuple(documents),
        top_n=request.top_n or 0,
        return_documents=request.return_documents is not False,
    )
    return encode_call(head, identity, inputs, params, request.priority, reply)
