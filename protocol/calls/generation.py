"""The engine-backed call: submit `Generate`s, turn `Tokens`/`Failed` events into a response.

Shared by chat and completions; they supply the wire shapes (`_opening_frames`, `_step_frames`,
`_response_body`). The HTTP status is committed only at the first engine output of a stream (or
at the end of a non-streamed response), so a `Failed` before that keeps its real status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from protocol.calls.base import JSON_CONTENT_TYPE, CallSettings, EngineCall, Headers, retry_after
from protocol.calls.sample import Sample, Step, TextOptions
from protocol.engine_api import Abort, Event, Failed, Generate, TokenLogprobs, Tokens
from protocol.errors import ProtocolError
from protocol.logprobs import TokenNames
from protocol.model import ServedModel
from protocol.outputs import Body, EndResponse, Output, StartResponse, Submit, whole_response
from protocol.requests import ChatCompletionRequest, CompletionRequest
from protocol.responses import PromptTokenUsageInfo, UsageInfo, encode, usage_chunk
from protocol.sse import DONE_FRAME, SSE_HEADERS, data_frame, error_frame


@dataclass(frozen=True, slots=True)
class UsageOptions:
    include_usage: bool = False  # a final `choices: []` chunk with usage (streams)
    continuous: bool = False  # cumulative usage on every chunk (streams)
    prompt_tokens_details: bool = False  # `prompt_tokens_details.cached_tokens` when non-zero


def usage_options(stream_options: object | None, *, force: bool, details: bool) -> UsageOptions:
    """vLLM's `should_include_usage`: `stream_options`, or `--enable-force-include-usage`."""
    if stream_options is None:
        return UsageOptions(include_usage=force, prompt_tokens_details=details)
    include = bool(getattr(stream_options, "include_usage", False)) or force
    continuous = include and bool(getattr(stream_options, "continuous_usage_stats", False))
    return UsageOptions(include_usage=include, continuous=continuous, prompt_tokens_details=details)


class EngineRequest:
    """One `Generate` of the call and what its first event told us about the prompt."""

    def __init__(self, generate: Generate, prompt_index: int) -> None:
        self.generate = generate
        self.prompt_index = prompt_index
        self.num_cached_tokens = 0
        self.num_discarded_tokens = 0  # best_of candidates' tokens that no choice returns
        self.prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None

    @property
    def request_id(self) -> str:
        return self.generate.request_id

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self.generate.prompt_token_ids

    def observe(self, event: Tokens) -> None:
        self.num_cached_tokens = max(self.num_cached_tokens, event.num_cached_tokens)
        self.num_discarded_tokens += event.num_discarded_tokens
        if event.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = event.prompt_logprobs


class GenerationCall(EngineCall):
    """Streams SSE chunks or answers one JSON body from the engine's events."""

    chunk_object: str = ""  # `object` of stream chunks (for the usage chunk)

    def __init__(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        model: ServedModel,
        generates: Sequence[Generate],
        settings: CallSettings,
        *,
        response_id: str,
        created: int,
        headers: Headers = (),
        discard_output: bool = False,
        text_options: TextOptions | None = None,
    ) -> None:
        """One engine request per prompt; choice `prompt_index * n + i` is its sample i."""
        self.model = model.engine_name  # whose engine runs it (the shell routes by it)
        self.served_name = model.name  # what the response calls it (a LoRA adapter's own name)
        self.response_id = response_id
        self.created = created
        self.stream = bool(request.stream)
        self.usage_options = usage_options(
            request.stream_options,
            force=settings.enable_force_include_usage,
            details=settings.enable_prompt_tokens_details,
        )
        self.extra_headers = headers
        as_ids = request.return_tokens_as_token_ids
        self.names = TokenNames(
            model.tokenizer, settings.return_tokens_as_token_ids if as_ids is None else as_ids
        )
        self.return_token_ids = bool(request.return_token_ids)
        self.requests = {
            generate.request_id: EngineRequest(generate, index) for index, generate in enumerate(generates)
        }
        options = text_options or TextOptions.of(request)
        self.samples = [
            Sample(
                choice_index=prompt_index * generate.params.n + i,
                request_id=generate.request_id,
                engine_index=i,
                tokenizer=model.tokenizer,
                prompt_token_ids=generate.prompt_token_ids,
                options=options,
                discard_output=discard_output,
            )
            for prompt_index, generate in enumerate(generates)
            for i in range(generate.params.n)
        ]
        self._by_key = {(sample.request_id, sample.engine_index): sample for sample in self.samples}
        self._unfinished = len(self.samples)
        self._committed = False
        self._done = False

    # ---- the Call interface ----

    def start(self) -> list[Output]:
        return [Submit(tuple(request.generate for request in self.requests.values()))]

    # ---- for subclasses ----

    def _opening_frames(self) -> list[bytes]:
        """Stream frames sent with the 200, before any sample's output."""
        return []

    def _step_frames(self, sample: Sample, step: Step) -> list[bytes]:
        raise NotImplementedError

    def _response_body(self) -> bytes:
        raise NotImplementedError

    def usage(self, *, final: bool = True) -> UsageInfo:
        """Exact usage so far: prompt tokens over all prompts, completion tokens over all samples
        (and over the best_of candidates not returned, as vLLM counts them)."""
        prompt_tokens = sum(len(request.prompt_token_ids) for request in self.requests.values())
        completion_tokens = sum(sample.num_tokens for sample in self.samples)
        completion_tokens += sum(request.num_discarded_tokens for request in self.requests.values())
        usage = UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        cached = sum(request.num_cached_tokens for request in self.requests.values())
        if final and self.usage_options.prompt_tokens_details and cached:
            usage.prompt_tokens_details = PromptTokenUsageInfo(cached_tokens=cached)
        return usage

    def running_usage(self) -> UsageInfo | None:
        """Usage for a stream chunk with `continuous_usage_stats`, else None."""
        if not self.usage_options.continuous:
            return None
        usage = self.usage(final=False)
        usage.prompt_tokens_details = msgspec.UNSET
        return usage

    # ---- event handling ----

    def _on_event(self, event: Event) -> list[Output]:
        if isinstance(event, Failed):
            if event.request_id not in self.requests:
                return []
            return self._fail(ProtocolError(event.message, status=event.status), event.request_id)
        if not isinstance(event, Tokens):
            return []
        request = self.requests.get(event.request_id)
        sample = self._by_key.get((event.request_id, event.index))
        if request is None or sample is None or sample.finished:
            return []
        request.observe(event)
        outputs: list[Output] = []
        if self.stream and not self._committed:
            outputs.extend(self._commit())
        step = sample.advance(event)
        if step.stopped_by_string:
            outputs.append(Submit((Abort(sample.request_id, sample.engine_index),)))
        if self.stream:
            outputs.extend(Body(frame) for frame in self._step_frames(sample, step))
        if step.finished:
            self._unfinished -= 1
            if self._unfinished == 0:
                outputs.extend(self._complete())
        return outputs

    def _commit(self) -> list[Output]:
        self._committed = True
        outputs: list[Output] = [StartResponse(200, SSE_HEADERS + self.extra_headers)]
        outputs.extend(Body(frame) for frame in self._opening_frames())
        return outputs

    def _complete(self) -> list[Output]:
        self._done = True
        if not self.stream:
            return list(whole_response(200, JSON_CONTENT_TYPE + self.extra_headers, self._response_body()))
        outputs: list[Output] = []
        if self.usage_options.include_usage:
            chunk = usage_chunk(self.response_id, self.chunk_object, self.created, self.served_name, self.usage())
            outputs.append(Body(data_frame(encode(chunk))))
        outputs += [Body(DONE_FRAME), EndResponse()]
        return outputs

    def _fail(self, error: ProtocolError, failed_request_id: str | None) -> list[Output]:
        """End the call with `error`: its real status before the stream started, else an SSE error."""
        self._done = True
        aborts = tuple(self._aborts(exclude=failed_request_id))
        for sample in self.samples:
            sample.finish_externally("abort")
        outputs: list[Output] = []
        if aborts:
            outputs.append(Submit(aborts))
        if self._committed:
            outputs += [Body(error_frame(error)), Body(DONE_FRAME), EndResponse()]
        else:
            headers = JSON_CONTENT_TYPE + self.extra_headers + retry_after(error.status)
            outputs += whole_response(error.status, headers, error.to_json())
        return outputs

    def _aborts(self, exclude: str | None) -> list[Abort]:
        """Aborts for every engine request that may still be running."""
        unfinished = {sample.request_id for sample in self.samples if not sample.finished}
        return [
            Abort(request_id)
            for request_id in self.requests
            if request_id in unfinished and request_id != exclude
        ]
