"""The Sans-IO application: HTTP request in (method, path, headers, body), a `Call` out.

Routing, API-key authentication, content-type checks and request ids live here; the per-request
behaviour lives in `protocol.calls`. Nothing here does IO or reads a clock or randomness except
through the injected `clock` and `new_id`, so every response is reproducible in tests.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote

import msgspec

from protocol.calls.base import (
    JSON_CONTENT_TYPE,
    Call,
    CallIdentity,
    CallSettings,
    Headers,
    ImmediateCall,
    error_call,
    internal_error,
    json_call,
)
from protocol.calls.chat import build_chat_call
from protocol.calls.completion import build_completion_call
from protocol.calls.info import (
    detokenize_call,
    health_call,
    model_call,
    models_call,
    tokenize_call,
    tokenizer_info_call,
    version_call,
)
from protocol.calls.lora import (
    AdapterCall,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    load_adapter_command,
    lora_base,
    unload_adapter_command,
)
from protocol.calls.pooling import build_classification_call, build_embedding_call, build_pooling_call
from protocol.calls.prompt import ChatRenderer
from protocol.calls.score import build_rerank_call, build_score_call
from protocol.calls.transcription import (
    DEFAULT_MAX_AUDIO_SECONDS,
    DEFAULT_MAX_AUDIO_UPLOAD_BYTES,
    SpeechSettings,
    build_transcription_call,
)
from protocol.cors import CorsPolicy
from protocol.errors import ProtocolError
from protocol.model import ServedModel, Task
from protocol.multipart import parse_form_data
from protocol.openapi import docs_page, openapi_document
from protocol.pooling_requests import (
    ClassificationChatRequest,
    ClassificationCompletionRequest,
    EmbeddingChatRequest,
    EmbeddingCompletionRequest,
    PoolingChatRequest,
    PoolingCompletionRequest,
    RerankRequest,
    ScoreRequest,
    decode_pooling_body,
)
from protocol.pooling_validation import POOLING_TASKS
from protocol.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    decode_request,
    decode_tokenize_request,
)
from protocol.state import PROMETHEUS_CONTENT_TYPE, SERVING, Health, ServerState, ServerStatus
from protocol.transcription import SpeechTask, read_speech_request
from protocol.validation import resolve_model

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024
# vLLM's h11 limits (--h11-max-header-count, --h11-max-incomplete-event-size), here enforced by the
# core for HTTP/1.1 and HTTP/2 alike, so the refusal is a 431 in OpenAI's shape
DEFAULT_MAX_HEADER_COUNT = 256
DEFAULT_MAX_HEADER_BYTES = 4 * 1024 * 1024
UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"
MULTIPART_ONLY = (
    "Send the audio as multipart/form-data (a 'file' part and form fields), as OpenAI's API takes it; "
    "got Content-Type '{content_type}'."
)
# With API keys set, every path needs one except these (liveness, version and metrics for load
# balancers, orchestrators and Prometheus, which carry no key; vLLM leaves /metrics open too). vLLM guards only /v1; its /tokenize, /pooling, /score, /rerank
# and /classify stay open to anyone who can reach the port.
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/openapi.json", "/docs"})
# While the server drains (SIGTERM) these still answer; anything else gets a 503 at once, so a load
# balancer that has not yet seen /health turn 503 retries elsewhere.
OPEN_WHILE_DRAINING = OPEN_PATHS | {"/load", "/v1/models"}
DRAINING_MESSAGE = "The server is shutting down and takes no new requests; retry on another replica."


class AppConfig(msgspec.Struct, kw_only=True):
    """Server options that shape responses (the CLI fills them; defaults are vLLM's)."""

    api_keys: list[str] = msgspec.field(default_factory=list)
    max_logprobs: int = 20
    response_role: str = "assistant"
    chat_template: str | None = None  # the template text, already loaded by the CLI
    chat_template_content_format: Literal["auto", "string", "openai"] = "auto"
    trust_request_chat_template: bool = False
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    return_tokens_as_token_ids: bool = False
    enable_request_id_headers: bool = False
    enable_server_load_tracking: bool = False  # GET /load reports in-flight requests (else 0)
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info exists (vLLM's flag; off: 404)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter exist (vLLM's
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING; off: 404)
    allow_runtime_lora_updating: bool = False
    root_path: str = ""
    version: str = "0.1.0"
    allow_priority: bool = False
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT  # more header fields: 431
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # header fields as HTTP/1.1 writes them: 431 past it
    enable_auto_tool_choice: bool = False
    exclude_tools_when_tool_choice_none: bool = False
    allowed_origins: list[str] = msgspec.field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = msgspec.field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = msgspec.field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # media items per prompt and modality (vLLM's --limit-mm-per-prompt; unset: 999)
    limit_mm_per_prompt: dict[str, int] = msgspec.field(default_factory=dict)
    enable_mm_embeds: bool = False  # `image_embeds` content parts accepted (vLLM's --enable-mm-embeds)
    # speech to text: an uploaded audio file over this many bytes is a 413 (OpenAI's 25 MB)
    max_audio_upload_bytes: int = DEFAULT_MAX_AUDIO_UPLOAD_BYTES
    max_audio_upload_seconds: float = DEFAULT_MAX_AUDIO_SECONDS  # longer decoded audio: a 400


@dataclass(frozen=True, slots=True)
class _Request:
    """One HTTP request as the handlers see it."""

    headers: dict[bytes, bytes]  # lower-cased names; the last value of a repeated header wins
    body: bytes
    status: ServerStatus
    query: str  # the target's query string, undecoded ("" without one)
    base_id: str  # X-Request-Id header, else a fresh id (the body's request_id may override it)
    response_headers: Headers  # X-Request-Id, when enabled

    def generation_id(self, body_request_id: str | None) -> tuple[str, Headers]:
        """Base id of an engine-backed call: the header, else the body's `request_id`, else fresh."""
        if b"x-request-id" in self.headers or not body_request_id:
            return self.base_id, self.response_headers
        if self.response_headers and _header_safe(body_request_id):
            return body_request_id, ((b"x-request-id", body_request_id.encode("ascii")),)
        return body_request_id, self.response_headers


def _header_safe(value: str) -> bool:
    """Printable ASCII only: a body's `request_id` must not smuggle line breaks into a header."""
    return value.isascii() and value.isprintable()


_Handler = Callable[["App", _Request], Call]


class App:
    """Routes requests to calls. `handle` never raises: every failure is an OpenAI-shaped error."""

    def __init__(
        self,
        config: AppConfig,
        models: list[ServedModel],
        *,
        clock: Callable[[], float],
        new_id: Callable[[], str],
        state: ServerState | None = None,
    ) -> None:
        self.config = config
        self.models = list(models)
        self.clock = clock
        self.new_id = new_id
        self.state = state  # what only the running server knows (metrics); None: no /metrics
        self._cors = CorsPolicy(
            config.allowed_origins, config.allowed_methods, config.allowed_headers, config.allow_credentials
        )
        self._key_digests = [hashlib.sha256(key.encode()).digest() for key in config.api_keys]
        # vLLM registers /tokenizer_info only with its flag: without it the route is absent (404,
        # no Allow), not refused
        absent = set() if config.enable_tokenizer_info_endpoint else {"/tokenizer_info"}
        if not config.allow_runtime_lora_updating:
            absent |= {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
        self._routes = {path: methods for path, methods in _ROUTES.items() if path not in absent}
        self._renderer = ChatRenderer(
            server_template=config.chat_template,
            content_format=config.chat_template_content_format,
            trust_request_template=config.trust_request_chat_template,
            clock=clock,
            exclude_tools_when_tool_choice_none=config.exclude_tools_when_tool_choice_none,
            limit_mm_per_prompt=config.limit_mm_per_prompt,
            enable_mm_embeds=config.enable_mm_embeds,
        )
        self._settings = CallSettings(
            response_role=config.response_role,
            max_logprobs=config.max_logprobs,
            allow_priority=config.allow_priority,
            return_tokens_as_token_ids=config.return_tokens_as_token_ids,
            enable_force_include_usage=config.enable_force_include_usage,
            enable_prompt_tokens_details=config.enable_prompt_tokens_details,
            enable_auto_tool_choice=config.enable_auto_tool_choice,
            tool_call_parser=config.tool_call_parser,
            reasoning_parser=config.reasoning_parser,
        )
        self._speech_settings = SpeechSettings(
            max_upload_bytes=config.max_audio_upload_bytes,
            max_seconds=config.max_audio_upload_seconds,
            enable_force_include_usage=config.enable_force_include_usage,
        )

    def handle(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        status: ServerStatus = SERVING,
    ) -> Call:
        """The call answering one request (its `start()` says what to do first); `status` is the
        shell's state as the request arrives (health, drain, load)."""
        response_headers: Headers = ()
        try:
            header_map = {bytes(name).lower(): bytes(value) for name, value in headers}
            request_header_id = header_map.get(b"x-request-id")
            base_id = request_header_id.decode("latin-1") if request_header_id else self.new_id()
            if self.config.enable_request_id_headers:
                response_headers = ((b"x-request-id", base_id.encode("latin-1", "replace")),)
            response_headers += self._cors.response_headers(header_map)
            self._check_header_limits(headers)
            if method.upper() == "OPTIONS" and (preflight := self._cors.preflight(header_map)) is not None:
                status, text, headers = preflight
                return ImmediateCall(status, text, headers)
            query = path.partition("?")[2]
            request = _Request(header_map, body, status, query, base_id, response_headers)
            return self._route(method.upper(), path, request)
        except ProtocolError as error:
            return error_call(error, response_headers)
        except Exception as exc:  # a bug in the core: a 500, never an escaped exception
            logger.exception("failed to handle %s %s", method, path)
            return error_call(internal_error(exc), response_headers)

    # ---- routing ----

    def _route(self, method: str, target: str, request: _Request) -> Call:
        path = self._strip_root(target.split("?", 1)[0])
        if request.status.health is Health.DRAINING and path not in OPEN_WHILE_DRAINING:
            return error_call(ProtocolError(DRAINING_MESSAGE, status=503), request.response_headers)
        if method != "OPTIONS" and self._key_digests and path not in OPEN_PATHS:
            if not self._authorized(request.headers.get(b"authorization")):
                return ImmediateCall(
                    401, b'{"error":"Unauthorized"}', JSON_CONTENT_TYPE + request.response_headers
                )
        methods = self._routes.get(path)
        if methods is None and path.startswith(_MODEL_PREFIX):  # ids may hold slashes (org/name)
            if method == "GET":
                return self._model(request, unquote(path[len(_MODEL_PREFIX) :]))
            methods = {"GET": App._models}
        if methods is None:
            raise ProtocolError("Not Found", status=404)
        if method == "OPTIONS":
            allow = ", ".join(sorted({*methods, "OPTIONS"})).encode()
            return ImmediateCall(200, b"", ((b"allow", allow), *request.response_headers))
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(methods)).encode()
            return error_call(
                ProtocolError("Method Not Allowed", status=405),
                ((b"allow", allow), *request.response_headers),
            )
        if path in _JSON_POSTS:
            self._check_json_post(request)
        return handler(self, request)

    def _check_header_limits(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """A 431 for too many or too large header fields, before any route runs: a client that
        sends thousands of fields or megabytes of cookies learns why, on either HTTP version."""
        count, limit = len(headers), self.config.max_header_count
        if count > limit:
            raise ProtocolError(
                f"Request Header Fields Too Large: {count} header fields, at most {limit} are allowed", status=431
            )
        size = sum(len(name) + len(value) + 4 for name, value in headers)  # `name: value\r\n`
        limit = self.config.max_header_bytes
        if size > limit:
            raise ProtocolError(
                f"Request Header Fields Too Large: the header fields take {size} bytes, at most {limit} are allowed",
                status=431,
            )

    def _strip_root(self, path: str) -> str:
        root = self.config.root_path.rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            return path[len(root) :] or "/"
        return path

    def _authorized(self, authorization: bytes | None) -> bool:
        """`Authorization: Bearer <key>`, scheme case-insensitive; digests compared in constant time."""
        if not authorization:
            return False
        scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        digest = hashlib.sha256(token.strip().encode("latin-1")).digest()
        matches = [hmac.compare_digest(digest, key) for key in self._key_digests]
        return any(matches)

    def _check_json_post(self, request: _Request) -> None:
        media_type = request.headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if media_type != b"application/json":
            raise ProtocolError(UNSUPPORTED_MEDIA_TYPE, status=400)
        if len(request.body) > self.config.max_request_body_bytes:
            raise ProtocolError(
                f"Request body too large: the limit is {self.config.max_request_body_bytes} bytes", status=413
            )

    # ---- handlers ----

    def _created(self) -> int:
        return int(self.clock())

    def _identity(self, request: _Request, body_request_id: str | None) -> CallIdentity:
        """The ids and time of an engine-backed call (see `CallIdentity`).

        The engine tag is a fresh suffix when the base id came from the client, who may reuse it
        concurrently."""
        base_id, headers = request.generation_id(body_request_id)
        created = self._created()
        from_client = base_id != request.base_id or b"x-request-id" in request.headers
        return CallIdentity(base_id, created, headers, f"-{self.new_id()}" if from_client else "")

    def _invocations(self, request: _Request) -> Call:
        """SageMaker's one route: the endpoint is chosen by the body's shape, as vLLM's /invocations."""
        try:
            document = msgspec.json.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            document = None
        if not isinstance(document, dict):
            raise ProtocolError("The /invocations body must be a JSON object.", status=400)
        for keys, handler in _INVOCATION_SHAPES:
            if all(key in document for key in keys):
                return handler(self, request)
        shapes = "; ".join(" and ".join(f"`{key}`" for key in keys) for keys, _ in _INVOCATION_SHAPES)
        raise ProtocolError(f"Cannot tell which API the /invocations body is for: it needs {shapes}.", status=400)

    def _load_lora_adapter(self, request: _Request) -> Call:
        body = decode_request(request.body, LoadLoRAAdapterRequest)
        base = lora_base(self.models, body.base_model_name)
        command = load_adapter_command(body, base, f"lora-load-{request.base_id}-{self.new_id()}")
        return AdapterCall(command, base, request.response_headers)

    def _unload_lora_adapter(self, request: _Request) -> Call:
        body = decode_request(request.body, UnloadLoRAAdapterRequest)
        base = lora_base(self.models, body.base_model_name)
        command = unload_adapter_command(body, base, f"lora-unload-{request.base_id}-{self.new_id()}")
        return AdapterCall(command, base, request.response_headers)

    def _chat(self, request: _Request) -> Call:
        body = decode_request(request.body, ChatCompletionRequest)
        model = self._generative_model(body.model, "Chat Completions")
        identity = self._identity(request, body.request_id)
        return build_chat_call(body, model, self._renderer, self._settings, identity)

    def _completion(self, request: _Request) -> Call:
        body = decode_request(request.body, CompletionRequest)
        model = self._generative_model(body.model, "Completions")
        identity = self._identity(request, body.request_id)
        return build_completion_call(body, model, self._settings, identity)

    def _embeddings(self, request: _Request) -> Call:
        body = decode_pooling_body(request.body, EmbeddingCompletionRequest, EmbeddingChatRequest)
        model = self._model_for(body.model, ("embed",))
        identity = self._identity(request, body.request_id)
        return build_embedding_call(body, model, self._renderer, self._settings, identity)

    def _pooling(self, request: _Request) -> Call:
        body = decode_pooling_body(request.body, PoolingCompletionRequest, PoolingChatRequest)
        model = self._model_for(body.model, POOLING_TASKS)
        identity = self._identity(request, body.request_id)
        return build_pooling_call(body, model, self._renderer, self._settings, identity)

    def _classify(self, request: _Request) -> Call:
        body = decode_pooling_body(request.body, ClassificationCompletionRequest, ClassificationChatRequest)
        model = self._model_for(body.model, ("classify",))
        identity = self._identity(request, body.request_id)
        return build_classification_call(body, model, self._renderer, self._settings, identity)

    def _score(self, request: _Request) -> Call:
        body = decode_request(request.body, ScoreRequest)
        model = self._model_for(body.model, ("score", "embed"))
        return build_score_call(body, model, self._settings, self._identity(request, None))

    def _rerank(self, request: _Request) -> Call:
        body = decode_request(request.body, RerankRequest)
        model = self._model_for(body.model, ("score", "embed"))
        return build_rerank_call(body, model, self._settings, self._identity(request, None))

    def _transcriptions(self, request: _Request) -> Call:
        return self._speech(request, "transcribe")

    def _translations(self, request: _Request) -> Call:
        return self._speech(request, "translate")

    def _speech(self, request: _Request, task: SpeechTask) -> Call:
        """A speech upload: multipart/form-data only (a JSON body is told so), parsed in the core."""
        content_type = request.headers.get(b"content-type", b"")
        if content_type.split(b";", 1)[0].strip().lower() != b"multipart/form-data":
            shown = content_type.decode("latin-1")[:100] or "none"
            raise ProtocolError(MULTIPART_ONLY.format(content_type=shown), status=400)
        if len(request.body) > self.config.max_request_body_bytes:
            raise ProtocolError(
                f"Request body too large: the limit is {self.config.max_request_body_bytes} bytes", status=413
            )
        body = read_speech_request(parse_form_data(content_type, request.body), task)
        model = self._model_for(body.model, ("transcription",))
        return build_transcription_call(body, model, self._speech_settings, self._identity(request, None))

    def _model_for(self, requested: str | None, tasks: Sequence[Task]) -> ServedModel:
        """The model a request names; none named, the first served model that has one of `tasks`
        (a server of a generative and an embedding model answers both APIs without `model`),
        else the first model (whose call then refuses the API)."""
        if not requested:
            for model in self.models:
                if any(model.supports(task) for task in tasks):
                    return model
        return resolve_model(requested, self.models)

    def _generative_model(self, requested: str | None, api: str) -> ServedModel:
        model = self._model_for(requested, ("generate",))
        if not model.supports("generate"):
            raise ProtocolError(f"The model does not support {api} API", status=400, param="model")
        return model

    def _models(self, request: _Request) -> Call:
        return models_call(self.models, self._created(), request.response_headers)

    def _model(self, request: _Request, model_id: str) -> Call:
        model = resolve_model(model_id, self.models) if model_id else None
        if model is None:
            raise ProtocolError("The model `` does not exist.", status=404, param="model")
        return model_call(model, self._created(), request.response_headers)

    def _openapi(self, request: _Request) -> Call:
        return json_call(openapi_document("sansllm", self.config.version), extra_headers=request.response_headers)

    def _docs(self, request: _Request) -> Call:
        page = docs_page(self.config.root_path.rstrip("/") + "/openapi.json")
        return ImmediateCall(200, page, ((b"content-type", b"text/html; charset=utf-8"), *request.response_headers))

    def _metrics(self, request: _Request) -> Call:
        if self.state is None:
            raise ProtocolError("Not Found", status=404)
        headers = ((b"content-type", PROMETHEUS_CONTENT_TYPE), *request.response_headers)
        return ImmediateCall(200, self.state.metrics(), headers)

    def _health(self, request: _Request) -> Call:
        return health_call(request.status.health is Health.SERVING, request.response_headers)

    def _load(self, request: _Request) -> Call:
        load = request.status.load if self.config.enable_server_load_tracking else 0
        return json_call(msgspec.json.encode({"server_load": load}), extra_headers=request.response_headers)

    def _version(self, request: _Request) -> Call:
        return version_call(self.config.version, request.response_headers)

    def _tokenize(self, request: _Request) -> Call:
        body = decode_tokenize_request(request.body)
        model = resolve_model(body.model, self.models)
        return tokenize_call(body, model, self._renderer, request.response_headers)

    def _detokenize(self, request: _Request) -> Call:
        body = decode_request(request.body, DetokenizeRequest)
        model = resolve_model(body.model, self.models)
        return detokenize_call(body, model, request.response_headers)

    def _tokenizer_info(self, request: _Request) -> Call:
        """GET /tokenizer_info[?model=NAME]: vLLM serves its one model's; `model` picks one of ours."""
        names = parse_qs(request.query).get("model")
        model = resolve_model(names[-1] if names else None, self.models)
        return tokenizer_info_call(model, self.config.chat_template, request.response_headers)


_ROUTES: dict[str, dict[str, _Handler]] = {
    "/v1/chat/completions": {"POST": App._chat},
    "/v1/completions": {"POST": App._completion},
    "/v1/models": {"GET": App._models},
    "/health": {"GET": App._health},
    "/ping": {"GET": App._health, "POST": App._health},
    "/version": {"GET": App._version},
    "/load": {"GET": App._load},
    "/metrics": {"GET": App._metrics},
    "/openapi.json": {"GET": App._openapi},
    "/docs": {"GET": App._docs},
    "/tokenize": {"POST": App._tokenize},
    "/detokenize": {"POST": App._detokenize},
    "/tokenizer_info": {"GET": App._tokenizer_info},
    "/v1/load_lora_adapter": {"POST": App._load_lora_adapter},
    "/v1/unload_lora_adapter": {"POST": App._unload_lora_adapter},
    "/v1/embeddings": {"POST": App._embeddings},
    "/pooling": {"POST": App._pooling},
    "/classify": {"POST": App._classify},
    "/score": {"POST": App._score},
    "/v1/score": {"POST": App._score},
    "/rerank": {"POST": App._rerank},
    "/v1/rerank": {"POST": App._rerank},
    "/v2/rerank": {"POST": App._rerank},
    "/v1/audio/transcriptions": {"POST": App._transcriptions},
    "/v1/audio/translations": {"POST": App._translations},
}
# (keys the body has, handler), first match wins: chat before completions (a chat body may carry a
# prompt-like field), rerank before score
_INVOCATION_SHAPES: tuple[tuple[tuple[str, ...], _Handler], ...] = (
    (("messages",), App._chat),
    (("prompt",), App._completion),
    (("input",), App._embeddings),
    (("query", "documents"), App._rerank),
    (("text_1", "text_2"), App._score),
)
_ROUTES["/invocations"] = {"POST": App._invocations}
_MODEL_PREFIX = "/v1/models/"
# the paths the server answers, as metrics label them (one model's card: `/v1/models/{model}`)
ROUTE_PATHS = frozenset({*_ROUTES, _MODEL_PREFIX + "{model}"})
_JSON_POSTS = frozenset(
    {
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/detokenize",
        "/v1/embeddings",
        "/pooling",
        "/classify",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/invocations",
    }
)
