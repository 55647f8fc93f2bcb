"""POST /v1/chat/completions: render the chat, submit it, answer in vLLM's chat shapes.

Streaming follows vLLM's `serving_chat`: a `{role, content: ""}` chunk per choice first, the echo
chunk per choice if asked, then one chunk per engine step and choice (empty deltas skipped),
`finish_reason` once per choice on its last chunk, and an optional usage chunk.

Each choice's text (after stop strings) goes through its `MessageStages`: the reasoning parser
(`--reasoning-parser`), then a tool parser: the `--tool-call-parser` for `tool_choice: "auto"`, or
the forced-call readers for a named or `"required"` choice (whose output structured output
constrains to JSON, `protocol.validation.tool_choice_schema`). Deltas carry `content`,
`reasoning` (and the deprecated `reasoning_content` copy) and `tool_calls`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from msgspec import UNSET

from protocol.calls.base import CallIdentity, CallSettings, Headers
from protocol.calls.generation import GenerationCall
from protocol.calls.media import MediaCall
from protocol.calls.prompt import ChatRenderer, encode_text, prepare_prompt_ids
from protocol.calls.sample import Sample, Step, TextOptions
from protocol.engine_api import Generate, MediaInput, TokenLogprobs
from protocol.logprobs import chat_logprobs, prompt_logprobs
from protocol.media.placement import place_media, shift_placements
from protocol.media.resolve import MediaPlan
from protocol.model import ServedModel
from protocol.output.deltas import MessageDelta, join
from protocol.output.forced import NamedToolCall, RequiredToolCalls
from protocol.output.reasoning import reasoning_parser
from protocol.output.stages import MessageStages
from protocol.output.tool_parsers import tool_parser
from protocol.output.tool_parsers.base import ToolParser, ToolSpec
from protocol.requests import ChatCompletionRequest
from protocol.responses import (
    ChatCompletionLogProbs,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    encode,
)
from protocol.sse import data_frame
from protocol.validation import chat_sampling_params, check_auto_tool_choice, check_chat_request


def build_chat_call(
    request: ChatCompletionRequest,
    model: ServedModel,
    renderer: ChatRenderer,
    settings: CallSettings,
    identity: CallIdentity,
) -> ChatCall | MediaCall:
    """Validate and render a decoded chat request; raises `ProtocolError` for a bad request.

    One engine request, `identity.engine_request_id(response_id)`: unique even when two clients
    send the same X-Request-Id or body `request_id` (the response id keeps the client's value).
    A prompt with media gets a `MediaCall`, which has the media fetched and decoded first."""
    check_chat_request(request, allow_priority=settings.allow_priority)
    check_auto_tool_choice(request, enabled=settings.enable_auto_tool_choice and bool(settings.tool_call_parser))
    prompt_text, media = renderer.render_with_media(request, model)
    token_ids = encode_text(model.tokenizer, prompt_text, request.add_special_tokens)
    plan = MediaPlan(media, model.multimodal) if model.multimodal is not None else None
    if plan is not None:  # placeholders typed in the text count too (they have no image)
        token_ids, placements = place_media(token_ids, media, plan.spec, plan.lengths())
    prompt_ids = prepare_prompt_ids(token_ids, model, request.truncate_prompt_tokens)
    if plan is not None:
        plan.place(shift_placements(placements, len(token_ids) - len(prompt_ids)))
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
        lora_name=model.lora_name,
    )

    def build(items: tuple[MediaInput, ...] = ()) -> ChatCall:
        return ChatCall(
            request,
            model,
            msgspec.structs.replace(generate, media=items) if items else generate,
            settings,
            response_id=response_id,
            created=identity.created,
            headers=identity.headers,
        )

    if plan is None or not media:
        return build()
    return MediaCall(plan, build, model.engine_name, identity.headers)


def _tool_mode(request: ChatCompletionRequest) -> str:
    if request.tools is None or request.tool_choice in (None, "none"):
        return "none"
    if isinstance(request.tool_choice, dict):
        return "named"
    return str(request.tool_choice)  # "auto" or "required"


class _ToolCallIds:
    """Tool-call ids unique within the response: `chatcmpl-tool-<response id>-<choice>-<call>`."""

    def __init__(self, response_id: str, choice_index: int) -> None:
        self.prefix = f"chatcmpl-tool-{response_id.removeprefix('chatcmpl-')}-{choice_index}"

    def __call__(self, index: int) -> str:
        return f"{self.prefix}-{index}"


def message_stages(
    request: ChatCompletionRequest, settings: CallSettings, response_id: str, choice_index: int
) -> MessageStages:
    """The reasoning and tool stages one choice's text goes through."""
    reasoning = reasoning_parser(settings.reasoning_parser)() if settings.reasoning_parser else None
    mode = _tool_mode(request)
    tools: ToolParser | None = None
    if mode != "none":
        specs = [ToolSpec(tool.function.name, tool.function.parameters) for tool in request.tools or ()]
        new_id = _ToolCallIds(response_id, choice_index)
        if mode == "named":
            assert isinstance(request.tool_choice, dict)
            tools = NamedToolCall(request.tool_choice["function"]["name"], specs, new_id)
        elif mode == "required":
            tools = RequiredToolCalls(specs, new_id)
        elif settings.tool_call_parser:
            tools = tool_parser(settings.tool_call_parser)(specs, new_id)
    return MessageStages(
        reasoning,
        tools,
        include_reasoning=request.include_reasoning,
        parallel_tool_calls=request.parallel_tool_calls is not False,
    )


def _text_options(request: ChatCompletionRequest, settings: CallSettings) -> TextOptions:
    """A tool format whose markers are special tokens (Qwen's `<tool_call>`) keeps them in the text."""
    options = TextOptions.of(request)
    if _tool_mode(request) == "auto" and settings.tool_call_parser:
        if not tool_parser(settings.tool_call_parser).skip_special_tokens:
            return TextOptions(
                options.stop, options.include_stop_str_in_output, False, options.spaces_between_special_tokens
            )
    return options


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
            request,
            model,
            [generate],
            settings,
            response_id=response_id,
            created=created,
            headers=headers,
            text_options=_text_options(request, settings),
        )
        self._request = request
        self._settings = settings
        self._tool_mode = _tool_mode(request)
        self._stages = {
            sample.choice_index: message_stages(request, settings, response_id, sample.choice_index)
            for sample in self.samples
        }
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
            model=self.served_name,
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
        stages = self._stages[sample.choice_index]
        delta = stages.feed(step.text) if step.text else MessageDelta()
        if step.finished:
            delta = delta + stages.finish()
        carries_tokens = bool(step.token_ids) and (self._want_logprobs or self.return_token_ids)
        if not delta and not step.finished and not carries_tokens:
            return []
        choice = ChatCompletionResponseStreamChoice(
            index=sample.choice_index,
            delta=_delta_message(delta),
            logprobs=self._logprobs(step.logprobs or ()),
            finish_reason=self._finish_reason(sample) if step.finished else None,
            stop_reason=sample.stop_reason if step.finished else UNSET,
            token_ids=list(step.token_ids) if self.return_token_ids else UNSET,
        )
        return [self._chunk(choice)]

    # ---- whole response ----

    def _finish_reason(self, sample: Sample) -> str | None:
        """`tool_calls` when an auto or required choice called a tool (a named one stays `stop`)."""
        if self._tool_mode in ("auto", "required") and self._stages[sample.choice_index].called:
            return "tool_calls"
        return sample.finish_reason

    def _message(self, sample: Sample) -> ChatMessage:
        stages = self._stages[sample.choice_index]
        deltas = [stages.feed(sample.text), stages.finish()] if sample.text else [stages.finish()]
        content, reasoning, calls = join(deltas)
        tool_calls = [
            ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)) for call in calls
        ]
        text: str | None = self._echo + content
        if not text and (reasoning or (tool_calls and self._tool_mode == "auto")):
            text = None  # vLLM: no content beside the reasoning or the parsed calls
        return ChatMessage(
            role=self._role,
            content=text,
            tool_calls=tool_calls,
            reasoning=reasoning or None,
            reasoning_content=reasoning or None,
        )

    def _response_body(self) -> bytes:
        choices = [
            ChatCompletionResponseChoice(
                index=sample.choice_index,
                message=self._message(sample),
                logprobs=self._logprobs(sample.logprobs),
                finish_reason=self._finish_reason(sample),
                stop_reason=sample.stop_reason,
                token_ids=list(sample.token_ids) if self.return_token_ids else None,
            )
            for sample in self.samples
        ]
        request = next(iter(self.requests.values()))
        response = ChatCompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.served_name,
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


def _delta_message(delta: MessageDelta) -> DeltaMessage:
    """The wire delta: a call's first piece carries `id`, `type` and `name`; later ones only arguments."""
    message = DeltaMessage()
    if delta.content:
        message.content = delta.content
    if delta.reasoning:
        message.reasoning = message.reasoning_content = delta.reasoning
    if delta.tool_calls:
        message.tool_calls = [
            DeltaToolCall(index=call.index, id=call.id, type="function", function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
            if call.id is not None
            else DeltaToolCall(index=call.index, function=DeltaFunctionCall(arguments=call.arguments))
            for call in delta.tool_calls
        ]
    return message
