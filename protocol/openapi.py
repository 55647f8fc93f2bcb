"""`/openapi.json`: the API described from the same msgspec structs that decode the requests and
encode the responses, so the description cannot drift from what the server does. Clients generate
code from it and fuzzers (schemathesis) drive the server with it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from protocol.calls.lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from protocol.pooling_requests import (
    ClassificationCompletionRequest,
    EmbeddingCompletionRequest,
    PoolingCompletionRequest,
    RerankRequest,
    ScoreRequest,
)
from protocol.pooling_responses import (
    ClassificationResponse,
    EmbeddingResponse,
    PoolingResponse,
    RerankResponse,
    ScoreResponse,
)
from protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from protocol.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from protocol.transcription import speech_form_schema
from protocol.transcription_output import (
    TranscriptionResponse,
    TranscriptionResponseVerbose,
    TranslationResponse,
)

# (path, summary, request body types (any of), response body type)
_POSTS: tuple[tuple[str, str, tuple[type, ...], type], ...] = (
    ("/v1/chat/completions", "Chat completion (streamed as SSE with `stream: true`)", (ChatCompletionRequest,), ChatCompletionResponse),
    ("/v1/completions", "Text completion (streamed as SSE with `stream: true`)", (CompletionRequest,), CompletionResponse),
    ("/v1/embeddings", "Embeddings", (EmbeddingCompletionRequest,), EmbeddingResponse),
    ("/pooling", "Pooled hidden states", (PoolingCompletionRequest,), PoolingResponse),
    ("/classify", "Classification", (ClassificationCompletionRequest,), ClassificationResponse),
    ("/score", "Scores of text pairs", (ScoreRequest,), ScoreResponse),
    ("/v1/score", "Scores of text pairs", (ScoreRequest,), ScoreResponse),
    ("/rerank", "Rerank documents (Jina's shape)", (RerankRequest,), RerankResponse),
    ("/v1/rerank", "Rerank documents (Jina's shape)", (RerankRequest,), RerankResponse),
    ("/v2/rerank", "Rerank documents (Cohere's shape)", (RerankRequest,), RerankResponse),
    ("/tokenize", "Tokenize a prompt or a chat", (TokenizeCompletionRequest, TokenizeChatRequest), TokenizeResponse),
    ("/detokenize", "Token ids to text", (DetokenizeRequest,), DetokenizeResponse),
)  # fmt: skip

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}


# A 401 is vLLM's authentication middleware's flat shape, not an OpenAI error object.
_UNAUTHORIZED_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


@cache
def openapi_document(title: str, version: str) -> bytes:
    """The OpenAPI 3.1 document, encoded (cached: the structs do not change while serving)."""
    speech = [TranscriptionResponse, TranslationResponse, TranscriptionResponseVerbose]
    types: list[type] = [ModelList, ModelCard, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest, *speech]
    for _, _, requests, response in _POSTS:
        types.extend(requests)
        types.append(response)
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(types, refs, strict=True))
    errors = {
        str(status): {"description": description, "content": _json({"$ref": "#/components/schemas/ErrorResponse"})}
        for status, description in ((400, "Bad request"), (404, "Unknown model"), (503, "Over capacity, or the engine is not running"))
    }  # fmt: skip
    unauthorized = {"401": {"description": "Missing or wrong API key", "content": _json({"$ref": "#/components/schemas/UnauthorizedResponse"})}}  # fmt: skip
    errors = {**errors, **unauthorized}
    paths: dict[str, Any] = {}
    for path, summary, requests, response in _POSTS:
        body = schema_of[requests[0]] if len(requests) == 1 else {"anyOf": [schema_of[r] for r in requests]}
        paths[path] = {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": _json(body)},
                "responses": {"200": {"description": "OK", "content": _json(schema_of[response])}, **errors},
            }
        }
    for path, summary, request in (
        ("/v1/load_lora_adapter", "Load a LoRA adapter (with --allow-runtime-lora-updating)", LoadLoRAAdapterRequest),
        ("/v1/unload_lora_adapter", "Unload a LoRA adapter (with --allow-runtime-lora-updating)", UnloadLoRAAdapterRequest),
    ):
        text = {"text/plain": {"schema": {"type": "string"}}}
        paths[path] = {"post": {"summary": summary, "requestBody": {"required": True, "content": _json(schema_of[request])}, "responses": {"200": {"description": "Done", "content": text}, **errors}}}
    paths.update(_speech_paths(schema_of, errors))
    paths["/v1/models"] = {"get": {"summary": "The served models", "responses": {"200": {"description": "OK", "content": _json(schema_of[ModelList])}, **unauthorized}}}
    paths["/v1/models/{model}"] = {
        "get": {
            "summary": "One served model",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK", "content": _json(schema_of[ModelCard])}, **errors},
        }
    }
    for path, summary in (("/health", "200, or 503 while an engine is not running or the server drains"), ("/ping", "As /health (SageMaker)")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "Healthy"}, "503": {"description": "Not healthy"}}}}
    paths["/version"] = {"get": {"summary": "The server's version", "responses": {"200": {"description": "OK"}}}}
    load = {"type": "object", "properties": {"server_load": {"type": "integer"}}, "required": ["server_load"]}
    paths["/load"] = {"get": {"summary": "Requests in flight (with --enable-server-load-tracking, else 0)", "responses": {"200": {"description": "OK", "content": _json(load)}, **unauthorized}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics under vLLM's names", "responses": {"200": {"description": "OK"}}}}
    tokenizer_info = {"type": "object", "properties": {"tokenizer_class": {"type": "string"}, "chat_template": {"type": "string"}}, "required": ["tokenizer_class"], "additionalProperties": True}
    paths["/tokenizer_info"] = {
        "get": {
            "summary": "The tokenizer's configuration: tokenizer_config.json's fields, tokenizer_class, chat_template (with --enable-tokenizer-info-endpoint, else 404)",
            "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"}, "description": "a served model's name (default: the first model)"}],
            "responses": {"200": {"description": "OK", "content": _json(tokenizer_info)}, **errors},
        }
    }
    document = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": {**components, "ErrorResponse": _ERROR_SCHEMA, "UnauthorizedResponse": _UNAUTHORIZED_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }  # fmt: skip
    return msgspec.json.encode(document)


def _speech_paths(schema_of: dict[type, Any], errors: dict[str, Any]) -> dict[str, Any]:
    """The speech-to-text uploads: a multipart/form-data form in; JSON, text, subtitles or SSE out."""
    paths: dict[str, Any] = {}
    for path, task, summary, whole in (
        ("/v1/audio/transcriptions", "transcribe", "Speech to text (OpenAI's form: a `file` part and fields)", TranscriptionResponse),
        ("/v1/audio/translations", "translate", "Speech to English text (OpenAI's form: a `file` part and fields)", TranslationResponse),
    ):
        json_body = {"anyOf": [schema_of[whole], schema_of[TranscriptionResponseVerbose]]}
        ok = {
            "description": "json or verbose_json; text and srt as text/plain, vtt as text/vtt; `stream=true` as SSE",
            "content": {
                **_json(json_body),
                "text/plain": {"schema": {"type": "string"}},
                "text/vtt": {"schema": {"type": "string"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
        too_large = {"description": "The body or the audio file is over its size limit", "content": _json({"$ref": "#/components/schemas/ErrorResponse"})}
        form = {"multipart/form-data": {"schema": speech_form_schema(task)}}
        paths[path] = {"post": {"summary": summary, "requestBody": {"required": True, "content": form}, "responses": {"200": ok, **errors, "413": too_large}}}
    return paths  # fmt: skip


SWAGGER_UI_VERSION = "5.17.14"


def docs_page(openapi_url: str) -> bytes:
    """GET /docs: Swagger UI over `openapi_url`, its assets from a CDN (as FastAPI's page, which vLLM
    serves): nothing is bundled, and a browser without internet access sees the bare page only."""
    cdn = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"
    return f"""<!DOCTYPE html>
<html><head><title>sansllm API</title><meta charset="utf-8">
<link rel="stylesheet" href="{cdn}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{cdn}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "{openapi_url}", dom_id: "#swagger-ui"}});</script>
</body></html>
""".encode()
