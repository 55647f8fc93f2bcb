"""Endpoints answered without the engine: /v1/models, /tokenize, /detokenize, /version, /health."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from protocol.calls.base import Headers, ImmediateCall, json_call
from protocol.calls.prompt import ChatRenderer, decode_ids, encode_text
from protocol.errors import ProtocolError
from protocol.model import ServedModel
from protocol.requests import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
)
from protocol.responses import DetokenizeResponse, TokenizeResponse, encode, model_list
from protocol.validation import check_tokenize_chat_request


class _Version(msgspec.Struct):
    version: str


def models_call(models: Sequence[ServedModel], now: int, headers: Headers = ()) -> ImmediateCall:
    """GET /v1/models; a model without a creation time reports the current time (as vLLM)."""
    listing = model_list(models)
    for card in listing.data:
        if not card.created:
            card.created = now
            for permission in card.permission:
                permission.created = now
    return json_call(encode(listing), extra_headers=headers)


def model_call(model: ServedModel, now: int, headers: Headers = ()) -> ImmediateCall:
    """GET /v1/models/{id}: the model's card, as OpenAI serves one (`id` is the model's first name,
    whichever of its names was asked)."""
    (card,) = model_list([model]).data
    if not card.created:
        card.created = now
        for permission in card.permission:
            permission.created = now
    return json_call(encode(card), extra_headers=headers)


def version_call(version: str, headers: Headers = ()) -> ImmediateCall:
    return json_call(encode(_Version(version)), extra_headers=headers)


def health_call(healthy: bool, headers: Headers = ()) -> ImmediateCall:
    """GET /health and /ping: an empty 200, or 503 once the engine died."""
    return ImmediateCall(200 if healthy else 503, b"", headers)


def tokenize_call(
    request: TokenizeRequest, model: ServedModel, renderer: ChatRenderer, headers: Headers = ()
) -> ImmediateCall:
    """POST /tokenize with a `prompt` or chat `messages` (rendered like a chat request)."""
    if isinstance(request, TokenizeChatRequest):
        check_tokenize_chat_request(request)
        text = renderer.render(request, model)
    else:
        assert isinstance(request, TokenizeCompletionRequest)
        text = request.prompt
    ids = encode_text(model.tokenizer, text, request.add_special_tokens)
    token_strs = None
    if request.return_token_strs:
        try:
            token_strs = list(model.tokenizer.convert_ids_to_tokens(ids))
        except Exception as exc:
            raise ProtocolError(f"The tokens could not be spelled out: {exc}") from None
    response = TokenizeResponse(
        count=len(ids), max_model_len=model.max_model_len, tokens=ids, token_strs=token_strs
    )
    return json_call(encode(response), extra_headers=headers)


def detokenize_call(request: DetokenizeRequest, model: ServedModel, headers: Headers = ()) -> ImmediateCall:
    """POST /detokenize: token ids back to text (special tokens kept, as HF's default decode)."""
    vocab_size = model.tokenizer.vocab_size
    for token_id in request.tokens:
        if not 0 <= token_id < vocab_size:
            raise ProtocolError(f"Token id {token_id} is out of vocabulary", param="tokens")
    text = decode_ids(model.tokenizer, request.tokens)
    return json_call(encode(DetokenizeResponse(prompt=text)), extra_headers=headers)


def tokenizer_info_call(model: ServedModel, server_template: str | None, headers: Headers = ()) -> ImmediateCall:
    """GET /tokenizer_info: the model's tokenizer configuration, as vLLM's (tokenizer_config.json's
    fields and `tokenizer_class`), with the chat template this server applies: `--chat-template`
    when given, else the model's."""
    tokenizer = model.tokenizer
    info = dict(model.tokenizer_config)
    info.setdefault("tokenizer_class", type(tokenizer).__name__)
    for key, token in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token)):
        if token is not None:
            info.setdefault(key, token)
    template = server_template or tokenizer.chat_template
    if template:
        info["chat_template"] = template
    return json_call(msgspec.json.encode(info), extra_headers=headers)
