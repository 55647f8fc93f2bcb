"""Request bodies of the pooling endpoints (/v1/embeddings, /pooling, /classify, /score, /rerank).

Field names and defaults follow vLLM's `protocol.py` (reference/openai-server.md §2, "Embeddings,
pooling, score, rerank"); unknown fields are ignored, as for every request. Each endpoint that
takes chat `messages` has a completion-style and a chat-style body, told apart by the presence of
`messages` (`decode_pooling_body`). `__post_init__` checks only shapes msgspec's types cannot
express; the semantic rules live in `protocol.pooling_validation`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from protocol.requests import (
    JsonObject,
    TruncatePromptTokens,
    _check_messages,
    _is_token_id,
    _Request,
    decode_request,
)

EncodingFormat = Literal["float", "base64", "bytes"]
EmbedDType = Literal["float32", "float16", "bfloat16"]
Endianness = Literal["native", "big", "little"]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]

# `input`: a string, a list of strings, a list of token ids, or a list of token-id lists
PoolingInput = str | list[Any]


def _check_input(value: PoolingInput) -> None:
    if isinstance(value, str) or not value:
        return
    if all(isinstance(item, str) for item in value):
        return
    if all(_is_token_id(item) for item in value):
        return
    if all(isinstance(item, list) and all(_is_token_id(t) for t in item) for item in value):
        return
    raise ValueError(
        "`input` must be a string, a list of strings, a list of token ids or a list of token-id lists"
    )


class _ActivationOptions(_Request, kw_only=True):
    """`use_activation` and its deprecated spellings `softmax` and `activation` (vLLM)."""

    use_activation: bool | None = None
    softmax: bool | None = None
    activation: bool | None = None


def activation_flag(request: object) -> bool | None:
    """The request's `use_activation`, whichever spelling it used (None: the model's default)."""
    for name in ("use_activation", "softmax", "activation"):
        value = getattr(request, name, None)
        if value is not None:
            return bool(value)
    return None


class _EmbeddingOptions(_Request, kw_only=True):
    """What completion- and chat-style embedding and pooling requests share."""

    model: str | None = None
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    priority: int = 0
    request_id: str | None = None  # None: the core injects one
    normalize: bool | None = None
    embed_dtype: EmbedDType = "float32"  # base64 and bytes only
    endianness: Endianness = "native"  # base64 and bytes only
    mm_processor_kwargs: JsonObject | None = None


class EmbeddingCompletionRequest(_EmbeddingOptions, kw_only=True):
    """POST /v1/embeddings with `input` (also the base of /pooling's `PoolingCompletionRequest`)."""

    input: PoolingInput
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_input(self.input)


class EmbeddingChatRequest(_EmbeddingOptions, kw_only=True):
    """POST /v1/embeddings with chat `messages`, rendered by the chat template."""

    messages: list[JsonObject]
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: JsonObject | None = None

    def __post_init__(self) -> None:
        _check_messages(self.messages)


class PoolingCompletionRequest(EmbeddingCompletionRequest, kw_only=True):
    """POST /pooling with `input`: an embedding request plus `task` and `use_activation`.

    `task` None: the model's per-token task if it has one (vLLM's default), else its only task.
    """

    task: str | None = None
    use_activation: bool | None = None
    softmax: bool | None = None  # deprecated spelling of use_activation
    activation: bool | None = None  # deprecated spelling of use_activation


class PoolingChatRequest(EmbeddingChatRequest, kw_only=True):
    """POST /pooling with chat `messages`."""

    task: str | None = None
    use_activation: bool | None = None
    softmax: bool | None = None  # deprecated spelling of use_activation
    activation: bool | None = None  # deprecated spelling of use_activation


class ClassificationCompletionRequest(_ActivationOptions, kw_only=True):
    """POST /classify with `input`."""

    model: str | None = None
    input: PoolingInput
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    user: str | None = None
    priority: int = 0
    add_special_tokens: bool = True
    request_id: str | None = None

    def __post_init__(self) -> None:
        _check_input(self.input)


class ClassificationChatRequest(_ActivationOptions, kw_only=True):
    """POST /classify with chat `messages`."""

    model: str | None = None
    messages: list[JsonObject]
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    user: str | None = None
    priority: int = 0
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: JsonObject | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        _check_messages(self.messages)


EmbeddingRequest = EmbeddingCompletionRequest | EmbeddingChatRequest
PoolingRequest = PoolingCompletionRequest | PoolingChatRequest
ClassificationRequest = ClassificationCompletionRequest | ClassificationChatRequest
ChatStyleRequest = EmbeddingChatRequest | ClassificationChatRequest

_TEXT_PAIRS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))


class ScoreRequest(_ActivationOptions, kw_only=True):
    """POST /score and /v1/score: `text_1` against `text_2` (1:1, 1:N or N:N).

    The newer spellings `queries`/`documents`, `queries`/`items` and `data_1`/`data_2` are
    accepted too; exactly one pair must be given.
    """

    model: str | None = None
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    priority: int = 0
    mm_processor_kwargs: JsonObject | None = None

    def __post_init__(self) -> None:
        given = {name for pair in _TEXT_PAIRS for name in pair if getattr(self, name) is not None}
        complete = [pair for pair in _TEXT_PAIRS if set(pair) <= given]
        if len(complete) != 1 or given != set(complete[0]):
            raise ValueError(
                "give the texts to score as `text_1` and `text_2` (or `queries` and `documents`, "
                "`queries` and `items`, `data_1` and `data_2`), one pair only"
            )

    def texts(self) -> tuple[list[str], list[str], tuple[str, str]]:
        """(first texts, second texts, the two field names used)."""
        for first, second in _TEXT_PAIRS:
            a, b = getattr(self, first), getattr(self, second)
            if a is not None and b is not None:
                return _as_list(a), _as_list(b), (first, second)
        raise AssertionError("checked in __post_init__")


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class RerankDocumentIn(_Request, kw_only=True):
    """A document given as an object (Cohere, Jina): only its `text` is ranked."""

    text: str


class RerankRequest(_ActivationOptions, kw_only=True):
    """POST /rerank, /v1/rerank, /v2/rerank: vLLM's, Jina's and Cohere's (v1, v2) request shapes.

    `top_n` 0 or absent returns every document; `return_documents` (default true) echoes each
    document's text. Cohere's `max_tokens_per_doc`, `max_chunks_per_doc` and `rank_fields` are
    accepted and ignored.
    """

    model: str | None = None
    query: str
    documents: list[str | RerankDocumentIn]
    top_n: NonNegative | None = None
    return_documents: bool | None = True
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    priority: int = 0
    max_tokens_per_doc: int | None = None
    max_chunks_per_doc: int | None = None
    rank_fields: list[str] | None = None
    mm_processor_kwargs: JsonObject | None = None

    def document_texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


# ---- decoding ----

C = TypeVar("C")
H = TypeVar("H")


class _MessagesProbe(msgspec.Struct):
    messages: Any = msgspec.UNSET


def decode_pooling_body(body: bytes, completion_kind: type[C], chat_kind: type[H]) -> C | H:
    """A body with `messages` is the chat-style request, any other the completion-style one."""
    try:
        probe = msgspec.json.decode(body, type=_MessagesProbe)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        probe = None
    if probe is not None and probe.messages is not msgspec.UNSET:
        return decode_request(body, chat_kind)
    return decode_request(body, completion_kind)
