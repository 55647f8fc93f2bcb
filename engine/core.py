"""The engine's step logic, free of threads: admit commands, run one model step, emit events.

Each step runs one forward pass over a flat batch that mixes the prompts admitted this step
(whole, no chunking yet) with one decode token per running sample. A prompt is prefilled once
per request; its n samples then fork the prompt's cache and decode separately.
A paged cache with chunked prefill (engine/scheduler.py, engine/kv_cache.py) is meant to replace
`_schedule` and the per-sequence caches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, SequenceKVCache
from engine.models.llama import LlamaForCausalLM
from engine.requests import RequestRejected, RequestState, SampleState, finish_check, validate
from engine.sampler import Sampler, SamplingRow, prompt_logprobs
from protocol.engine_api import Abort, Command, Encode, Event, Failed, Generate, TokenLogprobs, Tokens

_PROMPT_LOGPROBS_CHUNK = 256  # prompt rows turned into logits at a time


@dataclass
class _Batch:
    prefills: list[RequestState]
    decodes: list[tuple[RequestState, SampleState]]


class EngineCore:
    def __init__(
        self,
        model: LlamaForCausalLM,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        seed: int = 0,
    ):
        self.model = model
        self.config = model.config
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(seed))
        self.requests: dict[str, RequestState] = {}
        self._arrivals = itertools.count()

    # ---- commands ----

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    @property
    def num_running_samples(self) -> int:
        return sum(len(r.samples) for r in self.requests.values())

    @property
    def num_waiting_requests(self) -> int:
        return sum(1 for r in self.requests.values() if not r.prefilled)

    def add(self, commands: Iterable[Command]) -> list[Event]:
        """Take commands in order; returns the immediate failures."""
        events: list[Event] = []
        for command in commands:
            if isinstance(command, Generate):
                events.extend(self._add_generate(command))
            elif isinstance(command, Abort):
                self._abort(command)
            elif isinstance(command, Encode):
                events.append(
                    Failed(command.request_id, 400, "this model generates text; it does not serve embeddings")
                )
        return events

    def _add_generate(self, command: Generate) -> list[Event]:
        if command.request_id in self.requests:
            return [Failed(command.request_id, 400, f"request id {command.request_id!r} is already running")]
        try:
            max_tokens = validate(command, self.config.vocab_size, self.max_model_len, self.max_num_seqs)
        except RequestRejected as error:
            return [Failed(command.request_id, error.status, str(error))]
        self.requests[command.request_id] = RequestState(
            command.request_id,
            tuple(command.prompt_token_ids),
            command.params,
            command.priority,
            next(self._arrivals),
            max_tokens,
        )
        return []

    def _abort(self, command: Abort) -> None:
        """Drop a request or one sample, silently: the protocol side already knows."""
        request = self.requests.get(command.request_id)
        if request is None:
            return
        if command.index is None:
            del self.requests[command.request_id]
            return
        request.dropped_indices.add(command.index)
        request.samples.pop(command.index, None)
        if not request.live_indices or (request.prefilled and not request.samples):
            del self.requests[command.request_id]

    def fail_all(self, status: int, message: str) -> list[Event]:
        """Fail every live request (the engine is going away)."""
        events: list[Event] = [Failed(rid, status, message) for rid in self.requests]
        self.requests.clear()
        return events

    # ---- one step ----

    def step(self) -> list[Event]:
        batch = self._schedule()
        if not batch.prefills and not batch.decodes:
            return []
        with torch.inference_mode():
            return self._run(batch)

    def _schedule(self) -> _Batch:
        """Decode every running sample, then admit waiting prompts in (priority, arrival) order.

        Prompts fill the token budget left by the decodes; the first waiting prompt is always
        admitted when slots allow, so a prompt longer than the budget still runs (alone).
        """
        decodes = [(r, s) for r in self.requests.values() for s in r.samples.values()]
        budget = self.max_num_batched_tokens - len(decodes)
        slots = self.max_num_seqs - len(decodes)
        prefills: list[RequestState] = []
        waiting = sorted(
            (r for r in self.requests.values() if not r.prefilled), key=lambda r: (r.priority, r.arrival)
        )
        for request in waiting:
            needed = len(request.live_indices)
            fits = request.num_prompt_tokens <= budget or not prefills
            if needed > slots or not fits:
                break
            prefills.append(request)
            budget -= request.num_prompt_tokens
            slots -= needed
        return _Batch(prefills, decodes)

    def _run(self, batch: _Batch) -> list[Event]:
        input_ids, positions, meta, prefill_caches = self._flat_inputs(batch)
        hidden = self.model(input_ids, positions, meta)
        meta.commit()

        # logits only where we sample: each sequence's last token
        ends = list(itertools.accumulate(meta.query_lens))
        logits = self.model.compute_logits(hidden[torch.tensor([e - 1 for e in ends], device=self.device)])
        for i, request in enumerate(batch.prefills):
            if request.params.prompt_logprobs is not None:
                rows_of_prompt = hidden[ends[i] - meta.query_lens[i] : ends[i]]
                request.prompt_logprobs = self._prompt_logprobs(request, rows_of_prompt)

        row_logits, rows, owners = self._sampling_rows(batch, prefill_caches)
        events: list[Event] = []
        if rows:
            result = self.sampler(logits[torch.tensor(row_logits, device=self.device)], rows)
            for (request, sample), token, logprob, top in zip(
                owners, result.token_ids, result.logprobs, result.top_logprobs, strict=True
            ):
                events.append(self._advance(request, sample, token, logprob, top))
        for request in batch.prefills:  # max_tokens=0: the prompt is all there is
            if request.max_tokens == 0:
                events.extend(self._finish_without_tokens(request))
        return events

    def _advance(self, request: RequestState, sample: SampleState, token: int, logprob: float, top) -> Tokens:
        sample.output_token_ids.append(token)
        sample.cumulative_logprob += logprob
        finished = finish_check(token, sample, request, self.eos_token_ids)
        event = Tokens(
            request.request_id,
            sample.index,
            (token,),
            request.num_prompt_tokens,
            logprobs=None if top is None else (top,),
            prompt_logprobs=None if sample.sent_first_event else request.prompt_logprobs,
            finish_reason=finished[0] if finished else None,
            stop_reason=finished[1] if finished else None,
            cumulative_logprob=sample.cumulative_logprob,
        )
        sample.sent_first_event = True
        if finished:
            del request.samples[sample.index]
            if not request.samples:
                del self.requests[request.request_id]
        return event

    def _finish_without_tokens(self, request: RequestState) -> list[Event]:
        self.requests.pop(request.request_id, None)
        return [
            Tokens(
                request.request_id,
                index,
                (),
                request.num_prompt_tokens,
                prompt_logprobs=request.prompt_logprobs,
                finish_reason="length",
            )
            for index in request.live_indices
        ]

    # ---- helpers ----

    def _flat_inputs(
        self, batch: _Batch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[SequenceKVCache]]:
        """One flat batch: every new prompt whole, then one token per decoding sample."""
        tokens: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        starts: list[int] = []
        caches: list[SequenceKVCache] = []
        for request in batch.prefills:
            length = request.num_prompt_tokens
            caches.append(self._new_cache(length + min(request.max_tokens, 256)))
            tokens.extend(request.prompt_token_ids)
            positions.extend(range(length))
            query_lens.append(length)
            starts.append(0)
        prefill_caches = list(caches)
        for request, sample in batch.decodes:
            position = request.num_prompt_tokens + len(sample.output_token_ids) - 1
            tokens.append(sample.output_token_ids[-1])
            positions.append(position)
            query_lens.append(1)
            starts.append(position)
            caches.append(sample.cache)
        meta = AttentionMetadata(query_lens, starts, caches)
        input_ids = torch.tensor(tokens, device=self.device)
        return input_ids, torch.tensor(positions, device=self.device), meta, prefill_caches

    def _sampling_rows(
        self, batch: _Batch, prefill_caches: list[SequenceKVCache]
    ) -> tuple[list[int], list[SamplingRow], list[tuple[RequestState, SampleState]]]:
        """n rows per new prompt (sharing its logits row; samples fork its cache), one per decoding sample.

        Returns, per row: the index of its logits row, what the sampler needs, and whose it is.
        """
        row_logits: list[int] = []
        rows: list[SamplingRow] = []
        owners: list[tuple[RequestState, SampleState]] = []
        for i, request in enumerate(batch.prefills):
            if request.max_tokens == 0:
                continue
            indices = request.live_indices
            for j, index in enumerate(indices):
                cache = prefill_caches[i] if j == len(indices) - 1 else prefill_caches[i].fork()
                sample = SampleState(index, cache, self._generator(request, index))
                request.samples[index] = sample
                owners.append((request, sample))
                row_logits.append(i)
                rows.append(self._row(request, sample))
        for k, (request, sample) in enumerate(batch.decodes):
            owners.append((request, sample))
            row_logits.append(len(batch.prefills) + k)
            rows.append(self._row(request, sample))
        return row_logits, rows, owners

    def _prompt_logprobs(
        self, request: RequestState, hidden: torch.Tensor
    ) -> tuple[TokenLogprobs | None, ...]:
        """Score each prompt token given the ones before it, a chunk of rows at a time so a long
        prompt never holds [prompt, vocab] logits at once. The first token has no score."""
        prompt, k = request.prompt_token_ids, request.params.prompt_logprobs
        entries: list[TokenLogprobs | None] = [None]
        for start in range(0, len(prompt) - 1, _PROMPT_LOGPROBS_CHUNK):
            stop = min(start + _PROMPT_LOGPROBS_CHUNK, len(prompt) - 1)
            logits = self.model.compute_logits(hidden[start:stop])
            entries.extend(prompt_logprobs(logits, prompt[start + 1 : stop + 1], k))
        return tuple(entries)

    def _row(self, request: RequestState, sample: SampleState) -> SamplingRow:
        return SamplingRow(
            request.params,
            request.prompt_token_ids,
            sample.output_token_ids,
            self.eos_token_ids,
            sample.generator,
        )

    def _generator(self, request: RequestState, index: int) -> torch.Generator | None:
        """Sample `index` of a seeded request draws from seed + index (as vLLM's n>1 children do)."""
        if request.params.seed is None:
            return None
        return torch.Generator(self.device).manual_seed(request.params.seed + index)

    def _new_cache(self, capacity: int) -> SequenceKVCache:
        cfg = self.config
        return SequenceKVCache(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            self.max_model_len,
            self.dtype,
            self.device,
            capacity,
        )
