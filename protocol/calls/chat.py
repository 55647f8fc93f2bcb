"""POST /v1/chat/completions: render the chat, submit it, answer in vLLM's chat shapes.

Streaming follows vLLM's `serving_chat`: a `{role, content: ""}` chunk per choice first, the echo
chunk per choice if asked, then one chunk per engine step and choice (empty deltas skipped),
`finish_reason` once per choice on its last chunk, and an optional usage chunk.

Tool calling stops at the template for now: `tools` are validated and rendered into the prompt,
and a named or "required" `tool_choice` constrains decoding to the tool's JSON (see
`protocol.validation.chat_sampling_params`); the output is returned as plain `content`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from msgspec import UNSET

from protocol.calls.base import CallIdentity, CallSettings, Headers
from protocol.calls.generation import GenerationCall
from protocol.calls.prompt import ChatRenderer, encode_text, prepare_prompt_ids
from protocol.calls.sample import Sample, Step
from protocol.engine_api import Generate, TokenLogprobs
from protocol.logprobs import chat_logprobs, prompt_logprobs
from protocol.model import ServedModel
from protocol.requests import ChatCompletionRequest
from protocol.responses import (
    ChatCompletionLogProbs,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    encode,
)
from protocol.sse import data_frame
from protocol.validation import chat_sampling_params, check_chat_request


def build_chat_call(
    request: ChatCompletionRequest,
    model: ServedModel,
    renderer: ChatRenderer,
    settings: CallSettings,
    identity: CallIdentity,
) -> ChatCall:
    """Validate and render a decoded chat request; raises `ProtocolError` for a bad request.

    One engine request, `identity.engine_request_id(response_id)`: unique even when two clients
    send the same X-Request-Id or body `request_id` (the response id keeps the client's value)."""
    check_chat_request(request, allow_priority=settings.allow_priority)
    prompt_text = renderer.render(request, model)
    prompt_ids = prepare_prompt_ids(
        encode_text(model.tokenizer, prompt_text, request.add_special_tokens),
        model,
        request.truncate_prompt_tokens,
    )
    params = chat_sampling_params(
        request, model, len(prompt_ids), settings.max_logprobs, allow_priority=settings.allow_priority
    )
    response_id = identity.response_id("chatcmpl")
    generate = Generate(
        request_id=identity.engine_request_id(response_id),
        prompt_token_ids=prompt_ids,
        params=params,
        priority=request.priority,
        cache_salt=request.cache_salt,
    )
    return ChatCall(
        request,
        model,
        generate,
        settings,
        response_id=response_id,
        created=identity.created,
        headers=identity.headers,
    )


def _message_text(message: dict[str, Any]) -> str:
    """A message's content as text: a string, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


class ChatCall(GenerationCall):
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        request: ChatCompletionRequest,
        model: ServedModel,
        generate: Generate,
        settings: CallSettings,
        *,
        response_id: str,
        created: int,
        headers: Headers = (),
    ) -> None:
        super().__init__(
            request, model, [generate], settings, response_id=response_id, created=created, headers=headers
        )
        last = request.messages[-1]
        self._role = settings.response_role if request.add_generation_prompt else str(last.get("role"))
        self._echo = _message_text(last) if request.echo and last.get("role") == self._role else ""
        self._want_logprobs = bool(request.logprobs)
        self._top_logprobs = request.top_logprobs or 0
        self._want_prompt_logprobs = generate.params.prompt_logprobs is not None
        self._generate = generate

    # ---- stream ----

    def _chunk(self, choice: ChatCompletionResponseStreamChoice, **extra: Any) -> bytes:
        usage = self.running_usage()
        chunk = ChatCompletionStreamResponse(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=UNSET if usage is None else usage,
            **extra,
        )
        return data_frame(encode(chunk))

    def _opening_frames(self) -> list[bytes]:
        frames = []
        prompt_ids = list(self._generate.prompt_token_ids) if self.return_token_ids else UNSET
        for sample in self.samples:
            choice = ChatCompletionResponseStreamChoice(
                index=sample.choice_index, delta=DeltaMessage(role=self._role, content="")
            )
            frames.append(self._chunk(choice, prompt_token_ids=prompt_ids))
        if self._echo:
            for sample in self.samples:
                choice = ChatCompletionResponseStreamChoice(
                    index=sample.choice_index, delta=DeltaMessage(content=self._echo)
                )
                frames.append(self._chunk(choice))
        return frames

    def _step_frames(self, sample: Sample, step: Step) -> list[bytes]:
        carries_tokens = bool(step.token_ids) and (self._want_logprobs or self.return_token_ids)
        if not step.text and not step.finished and not carries_tokens:
            return []
        choice = ChatCompletionResponseStreamChoice(
            index=sample.choice_index,
            delta=DeltaMessage(content=step.text) if step.text else DeltaMessage(),
            logprobs=self._logprobs(step.logprobs or ()),
            finish_reason=sample.finish_reason if step.finished else None,
            stop_reason=sample.stop_reason if step.finished else UNSET,
            token_ids=list(step.token_ids) if self.return_token_ids else UNSET,
        )
        return [self._chunk(choice)]

    # ---- whole response ----

    def _response_body(self) -> bytes:
        choices = [
            ChatCompletionResponseChoice(
                index=sample.choice_index,
                message=ChatMessage(role=self._role, content=self._echo + sample.text),
                logprobs=self._logprobs(sample.logprobs),
                finish_reason=sample.finish_reason,
                stop_reason=sample.stop_reason,
                token_ids=list(sample.token_ids) if self.return_token_ids else None,
            )
            for sample in self.samples
        ]
        request = next(iter(self.requests.values()))
        response = ChatCompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.usage(),
            prompt_logprobs=(
                prompt_logprobs(request.prompt_token_ids, request.prompt_logprobs or (), self.names)
                if self._want_prompt_logprobs
                else None
            ),
            prompt_token_ids=list(request.prompt_token_ids) if self.return_token_ids else None,
        )
        return encode(response)

    def _logprobs(self, entries: Sequence[TokenLogprobs]) -> ChatCompletionLogProbs | None:
        if not self._want_logprobs:
            return None
        return ChatCompletionLogProbs(content=chat_logprobs(entries, self._top_logprobs, self.names))
