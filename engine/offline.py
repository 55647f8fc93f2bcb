"""Offline generation without a server: text in, text out, on the calling thread.

For scripts and benchmarks. Chat prompts are rendered with transformers' `apply_chat_template`
(the server renders with the protocol core's sandboxed templates instead).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.engine import Engine, EngineConfig
from engine.model_files import DEFAULT_MODEL
from protocol.engine_api import (
    Encode,
    Failed,
    FinishReason,
    Generate,
    Pooled,
    PoolingParams,
    SamplingParams,
    TokenLogprobs,
    Tokens,
)

Messages = list[dict[str, Any]]


class GenerationFailed(RuntimeError):
    pass


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[Completion]
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


class LLM:
    """`LLM("SmolLM2-135M-Instruct").chat([{"role": "user", "content": "Hi"}])`, or
    `LLM("all-MiniLM-L6-v2").embed(["A sentence."])`."""

    def __init__(self, model: str = DEFAULT_MODEL, engine: Engine | None = None, **config: Any):
        self.engine = engine or Engine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids); outputs in prompt order."""
        params = params or SamplingParams()
        token_prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        request_ids = [f"offline-{next(self._ids)}" for _ in token_prompts]
        commands = [Generate(r, tuple(p), params) for r, p in zip(request_ids, token_prompts, strict=True)]
        results = {
            r: RequestOutput(p, [Completion(i) for i in range(params.n)])
            for r, p in zip(request_ids, token_prompts, strict=True)
        }
        for event in self.engine.generate_sync(commands):
            if isinstance(event, Failed):
                raise GenerationFailed(f"{event.status}: {event.message}")
            if isinstance(event, Tokens):
                _record(results[event.request_id], event)
        for result in results.values():
            for completion in result.outputs:
                completion.text = self.tokenizer.decode(completion.token_ids)
        return [results[r] for r in request_ids]

    def embed(
        self, inputs: Sequence[str | Sequence[int]], params: PoolingParams | None = None
    ) -> list[list[float]]:
        """One vector per input (text, or token ids), in input order, from an embedding model.

        Texts longer than the model's context are refused, as the server does (no silent truncation)."""
        params = params or PoolingParams()
        token_inputs = [self.tokenizer.encode(i) if isinstance(i, str) else list(i) for i in inputs]
        request_ids = [f"offline-{next(self._ids)}" for _ in token_inputs]
        commands = [Encode(r, tuple(p), params) for r, p in zip(request_ids, token_inputs, strict=True)]
        vectors: dict[str, list[float]] = {}
        for event in self.engine.generate_sync(commands):
            if isinstance(event, Failed):
                raise GenerationFailed(f"{event.status}: {event.message}")
            if isinstance(event, Pooled):
                vectors[event.request_id] = list(event.data)
        return [vectors[r] for r in request_ids]

    def chat(
        self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Answer one conversation or several, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self._render(c) for c in conversations]
        return self.generate(prompts, params)

    def _render(self, conversation: Messages) -> list[int]:
        rendered = self.tokenizer.hf.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding, 4.x a plain list of ids
        return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def _record(result: RequestOutput, event: Tokens) -> None:
    completion = result.outputs[event.index]
    completion.token_ids.extend(event.token_ids)
    if event.logprobs is not None:
        completion.logprobs = (completion.logprobs or []) + list(event.logprobs)
    if event.prompt_logprobs is not None:
        result.prompt_logprobs = event.prompt_logprobs
    if event.finish_reason is not None:
        completion.finish_reason, completion.stop_reason = event.finish_reason, event.stop_reason
