"""From request to prompt token ids: chat template choice and rendering, tokenization, truncation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec

from protocol.chat_template import ChatTemplate, normalize_messages
from protocol.errors import ProtocolError
from protocol.media.parts import MediaCollector, MediaPart
from protocol.model import ServedModel
from protocol.pooling_requests import ChatStyleRequest
from protocol.requests import ChatCompletionRequest, TokenizeChatRequest
from protocol.tokenizer import Tokenizer
from protocol.validation import check_prompt_token_ids, truncation_length

NO_TEMPLATE_MESSAGE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
    "template if the tokenizer does not define one."
)
UNTRUSTED_TEMPLATE_MESSAGE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template."
)
_CACHE_LIMIT = 32  # compiled templates kept (server and model templates, a few request ones)


class ChatRenderer:
    """Picks and caches chat templates and renders a chat request's messages into prompt text.

    Template priority (vLLM's `resolve_hf_chat_template`): the request's `chat_template` (only
    with `trust_request_chat_template`), the server's `chat_template`, the tokenizer's.
    """

    def __init__(
        self,
        *,
        server_template: str | None,
        content_format: str,
        trust_request_template: bool,
        clock: Callable[[], float],
        exclude_tools_when_tool_choice_none: bool = False,
        limit_mm_per_prompt: Mapping[str, int] | None = None,
        enable_mm_embeds: bool = False,
    ) -> None:
        self._server_template = server_template
        self._media_limits = dict(limit_mm_per_prompt or {})
        self._enable_mm_embeds = enable_mm_embeds
        self._exclude_tools_when_none = exclude_tools_when_tool_choice_none
        self._content_format = content_format
        self._trust_request_template = trust_request_template
        self._clock = clock
        self._compiled: dict[str, ChatTemplate] = {}

    def render(
        self, request: ChatCompletionRequest | TokenizeChatRequest | ChatStyleRequest, model: ServedModel
    ) -> str:
        """The prompt text of a chat-style request without media (the pooling endpoints')."""
        text, media = self.render_with_media(request, model)
        if media:
            raise ProtocolError(f"{media[0].where}: this endpoint does not take media inputs.", param="messages")
        return text

    def render_with_media(
        self, request: ChatCompletionRequest | TokenizeChatRequest | ChatStyleRequest, model: ServedModel
    ) -> tuple[str, list[MediaPart]]:
        """The prompt text of a chat-style request and its media parts in order (none for a text-only
        model, which refuses them); each part left its placeholder in the text."""
        template = self.template_for(request.chat_template, model)
        content_format = template.content_format if self._content_format == "auto" else self._content_format
        collector = (
            MediaCollector(model.multimodal, self._media_limits, allow_embeds=self._enable_mm_embeds)
            if model.multimodal is not None
            else None
        )
        messages = normalize_messages(request.messages, content_format, collector)
        request_tools = getattr(request, "tools", None)  # the pooling endpoints take no tools
        if self._exclude_tools_when_none and getattr(request, "tool_choice", None) == "none":
            request_tools = None  # `--exclude-tools-when-tool-choice-none`: the template sees no tools
        tools = [msgspec.to_builtins(tool) for tool in request_tools] if request_tools is not None else None
        kwargs: dict[str, Any] = dict(request.chat_template_kwargs or {})
        tokenizer = model.tokenizer
        text = template.render(
            messages,
            tools=tools,
            documents=getattr(request, "documents", None),
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            **kwargs,
        )
        return text, collector.parts if collector is not None else []

    def template_for(self, request_template: str | None, model: ServedModel) -> ChatTemplate:
        if request_template is not None and not self._trust_request_template:
            raise ProtocolError(UNTRUSTED_TEMPLATE_MESSAGE, param="chat_template")
        source = request_template or self._server_template or model.tokenizer.chat_template
        if source is None:
            raise ProtocolError(NO_TEMPLATE_MESSAGE, param="chat_template")
        template = self._compiled.get(source)
        if template is None:
            template = ChatTemplate(source, clock=lambda: datetime.fromtimestamp(self._clock()))
            if len(self._compiled) >= _CACHE_LIMIT:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[source] = template
        return template


def encode_text(tokenizer: Tokenizer, text: str, add_special_tokens: bool, *, param: str = "prompt") -> list[int]:
    """Tokenize client text; a tokenizer that chokes on it is the request's problem (400)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except Exception as exc:
        raise ProtocolError(f"The {param} could not be tokenized: {exc}", param=param) from None


def decode_ids(tokenizer: Tokenizer, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Detokenize client token ids (already checked to be in the vocabulary)."""
    try:
        return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    except Exception as exc:
        raise ProtocolError(f"The token ids could not be decoded: {exc}", param="tokens") from None


def prepare_prompt_ids(
    token_ids: Sequence[int], model: ServedModel, truncate_prompt_tokens: int | None
) -> tuple[int, ...]:
    """Left-truncate when asked (keep the last N tokens), then check the ids the engine will see."""
    keep = truncation_length(truncate_prompt_tokens, model.max_model_len)
    ids = tuple(token_ids)
    if keep is not None and len(ids) > keep:
        ids = ids[len(ids) - keep :]
    check_prompt_token_ids(ids, model.tokenizer.vocab_size)
    return ids
