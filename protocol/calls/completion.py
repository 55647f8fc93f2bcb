"""POST /v1/completions: one `Generate` per prompt, n samples each, answered in vLLM's shapes.

Choice `prompt_idx * n + i` is sample i of prompt `prompt_idx` (engine request
`f"{response_id}{engine_tag}-{prompt_idx}"`, see `CallIdentity`). `echo` prepends the prompt (and
its logprobs) to each choice; `echo` with `max_tokens=0` returns the prompt alone (the engine runs
one step whose token is dropped). Stream chunks carry every key, with nulls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol.calls.base import CallIdentity, CallSettings, Headers
from protocol.calls.generation import EngineRequest, GenerationCall
from protocol.calls.prompt import decode_ids, encode_text, prepare_prompt_ids
from protocol.calls.sample import Sample, Step
from protocol.engine_api import Generate, TokenLogprobs
from protocol.logprobs import CompletionLogprobsBuilder, prompt_logprobs
from protocol.model import ServedModel
from protocol.requests import CompletionRequest
from protocol.responses import (
    CompletionLogProbs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    encode,
)
from protocol.sse import data_frame
from protocol.validation import check_completion_request, completion_sampling_params


@dataclass(frozen=True, slots=True)
class _Prompt:
    token_ids: tuple[int, ...]
    text: str | None  # the client's string, or None for a token-id prompt (decoded on demand)


def _prompts(request: CompletionRequest, model: ServedModel) -> list[_Prompt]:
    """`prompt` as a list of prompts: a string, strings, token ids, or lists of token ids."""
    prompt = request.prompt
    if isinstance(prompt, str):
        items: Sequence[str | list[int]] = [prompt]
    elif prompt and all(isinstance(item, int) for item in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt or ())
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = encode_text(model.tokenizer, item, request.add_special_tokens)
            prompts.append(_Prompt(prepare_prompt_ids(ids, model, request.truncate_prompt_tokens), item))
        else:
            prompts.append(_Prompt(prepare_prompt_ids(item, model, request.truncate_prompt_tokens), None))
    return prompts


def build_completion_call(
    request: CompletionRequest,
    model: ServedModel,
    settings: CallSettings,
    identity: CallIdentity,
) -> CompletionCall:
    """Validate and tokenize a decoded completion request; raises `ProtocolError` for a bad request."""
    check_completion_request(request, allow_priority=settings.allow_priority)
    response_id = identity.response_id("cmpl")
    generates = []
    prompts = _prompts(request, model)
    for index, prompt in enumerate(prompts):
        params = completion_sampling_params(
            request,
            model,
            len(prompt.token_ids),
            settings.max_logprobs,
            allow_priority=settings.allow_priority,
        )
        generates.append(
            Generate(
                request_id=identity.engine_request_id(response_id, index),
                prompt_token_ids=prompt.token_ids,
                params=params,
                priority=request.priority,
                cache_salt=request.cache_salt,
                lora_name=model.lora_name,
            )
        )
    return CompletionCall(
        request,
        model,
        prompts,
        generates,
        settings,
        response_id=response_id,
        created=identity.created,
        headers=identity.headers,
    )


class CompletionCall(GenerationCall):
    chunk_object = "text_completion"

    def __init__(
        self,
        request: CompletionRequest,
        model: ServedModel,
        prompts: Sequence[_Prompt],
        generates: Sequence[Generate],
        settings: CallSettings,
        *,
        response_id: str,
        created: int,
        headers: Headers = (),
    ) -> None:
        super().__init__(
            request,
            model,
            generates,
            settings,
            response_id=response_id,
            created=created,
            headers=headers,
            discard_output=bool(request.echo) and request.max_tokens == 0,  # echo-only
        )
        self._tokenizer = model.tokenizer
        self._prompts = list(prompts)
        self._echo = bool(request.echo)
        self._logprobs_n = request.logprobs
        self._want_prompt_logprobs = request.prompt_logprobs is not None
        self._builders = {
            sample.choice_index: CompletionLogprobsBuilder(self._logprobs_n or 0, self.names)
            for sample in self.samples
        }
        self._started: set[int] = set()  # choices that sent a chunk already

    def _request_of(self, sample: Sample) -> EngineRequest:
        return self.requests[sample.request_id]

    def _prompt_text(self, sample: Sample) -> str:
        prompt = self._prompts[self._request_of(sample).prompt_index]
        if prompt.text is not None:
            return prompt.text
        return decode_ids(self._tokenizer, prompt.token_ids)

    def _logprobs(
        self, sample: Sample, token_ids: Sequence[int], entries: Sequence[TokenLogprobs], with_prompt: bool
    ) -> CompletionLogProbs | None:
        if self._logprobs_n is None:
            return None
        builder = self._builders[sample.choice_index]
        if with_prompt:
            request = self._request_of(sample)
            prompt_entries = request.prompt_logprobs or ()
            for position, token_id in enumerate(request.prompt_token_ids):
                builder.add(token_id, prompt_entries[position] if position < len(prompt_entries) else None)
        for position, token_id in enumerate(token_ids):
            builder.add(token_id, entries[position] if position < len(entries) else None)
        return builder.take()

    # ---- stream ----

    def _step_frames(self, sample: Sample, step: Step) -> list[bytes]:
        first_chunk = sample.choice_index not in self._started
        echo_now = self._echo and first_chunk
        text = self._prompt_text(sample) + step.text if echo_now else step.text
        carries_tokens = bool(step.token_ids) and (self._logprobs_n is not None or self.return_token_ids)
        if not text and not step.finished and not carries_tokens:
            return []
        self._started.add(sample.choice_index)
        request = self._request_of(sample)
        choice = CompletionResponseStreamChoice(
            index=sample.choice_index,
            text=text,
            logprobs=self._logprobs(sample, step.token_ids, step.logprobs or (), echo_now),
            finish_reason=sample.finish_reason if step.finished else None,
            stop_reason=sample.stop_reason if step.finished else None,
            token_ids=list(step.token_ids) if self.return_token_ids else None,
            prompt_token_ids=list(request.prompt_token_ids)
            if self.return_token_ids and first_chunk
            else None,
        )
        chunk = CompletionStreamResponse(
            id=self.response_id,
            created=self.created,
            model=self.served_name,
            choices=[choice],
            usage=self.running_usage(),
        )
        return [data_frame(encode(chunk))]

    # ---- whole response ----

    def _response_body(self) -> bytes:
        choices = []
        for sample in self.samples:
            request = self._request_of(sample)
            prefix = self._prompt_text(sample) if self._echo else ""
            choices.append(
                CompletionResponseChoice(
                    index=sample.choice_index,
                    text=prefix + sample.text,
                    logprobs=self._logprobs(sample, sample.token_ids, sample.logprobs, self._echo),
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason,
                    token_ids=list(sample.token_ids) if self.return_token_ids else None,
                    prompt_logprobs=(
                        prompt_logprobs(request.prompt_token_ids, request.prompt_logprobs or (), self.names)
                        if self._want_prompt_logprobs
                        else None
                    ),
                    prompt_token_ids=list(request.prompt_token_ids) if self.return_token_ids else None,
                )
            )
        response = CompletionResponse(
            id=self.response_id, created=self.created, model=self.served_name, choices=choices, usage=self.usage()
        )
        return encode(response)
