"""The step logic of a decoder model, free of threads: admit commands, run one model step, emit events.

Each request becomes one scheduled `Sequence` per sample (engine/scheduler.py); a step runs one
forward pass over the chunks the scheduler picked (prefill chunks and decodes mixed, within the
token budget) through the model runner (engine/model_runner.py), then samples a token for every
chunk that reached the end of its sequence. The n samples of a request share their prompt's
blocks through the prefix cache, as vLLM v1 does.

Prefill-only work rides the same path: a sequence marked `prefill_only` is scheduled and chunked
like any prompt, and when its last chunk is computed it is answered instead of sampled: an `Encode`
of a decoder embedding model gets its last token's hidden state pooled, a `Generate` with
`max_tokens=0` gets its prompt logprobs.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait

import msgspec
import torch

from engine.admission import over_capacity
from engine.attention import SequenceSpan
from engine.beam_search import BeamSearch, BeamSearchDriver
from engine.best_of import BestOfCollector
from engine.fault_isolation import requests_failing_alone
from engine.kv_cache import KVCacheManager
from engine.latency import LatencyObserver
from engine.lora import AdapterError, LoRAManager
from engine.model_runner import DecoderRunner
from engine.models.llama import LlamaForCausalLM
from engine.processors import builtin_processors
from engine.processors.base import LogitsProcessor
from engine.requests import (
    ImageInputs,
    RequestRejected,
    RequestState,
    SampleState,
    check_audio,
    check_media,
    check_pooling,
    finish_check,
    num_candidates,
    validate,
)
from engine.sampler import Sampler, SamplingRow, prompt_logprobs
from engine.scheduler import ScheduledChunk, Scheduler
from engine.scheduler import Sequence as ScheduledSequence
from engine.spec_decode import DraftedRow, SpeculativeConfig, Speculator, verify
from engine.step_budget import StepBudget
from engine.structured import CompiledGuide, ConstraintError, GuideCompiler
from protocol.engine_api import (
    Abort,
    AdapterLoaded,
    AdapterUnloaded,
    Command,
    Encode,
    Event,
    Failed,
    Generate,
    LoadAdapter,
    Pooled,
    TokenLogprobs,
    Tokens,
    UnloadAdapter,
)
from protocol.media.spec import SpeechSpec

logger = logging.getLogger(__name__)

Draft = tuple[int, ...]  # speculative tokens proposed for a decoding sequence

_PROMPT_LOGPROBS_CHUNK = 256  # prompt rows turned into logits at a time

DEFAULT_BLOCK_SIZE = 16
# Tokens per step. Measured on a 2-core CPU with SmolLM2-135M (1 thread, noisy): prefilling 2048 tokens
# runs at 165, 171, 177, 156 tok/s with budgets of 256, 512, 1024, 2048 tokens while the longest step
# (which every decode in it waits for) takes 2.0, 4.3, 7.0, 13.2 s: beyond ~512 only latency grows.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512


class EngineStats(msgspec.Struct, frozen=True):
    """What the engine reports for metrics; counts are of sequences (a request has n of them)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks held by live sequences
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # speculative decoding (vLLM's vllm:spec_decode_* counters); accepted tokens are draft tokens
    # the model confirmed (not the token each verification adds after them)
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()


class EngineCore:
    def __init__(
        self,
        model: LlamaForCausalLM,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        *,
        num_kv_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        tasks: frozenset[str] = frozenset({"generate"}),
        max_step_ratio: float = 0.0,  # EngineConfig's default turns it on
        speculative_config: SpeculativeConfig | None = None,
        guides: GuideCompiler | None = None,
        max_num_queued_requests: int | None = None,
        max_num_queued_tokens: int | None = None,
        max_queue_seconds: float | None = None,
        lora: LoRAManager | None = None,
        image_inputs: ImageInputs | None = None,
        speech: SpeechSpec | None = None,
        model_rules: Sequence[LogitsProcessor] = (),
    ):
        if max_model_len > num_kv_blocks * block_size:
            raise ValueError(
                f"max_model_len={max_model_len} does not fit in a KV cache of {num_kv_blocks} blocks "
                f"of {block_size} tokens; give the cache more memory or lower max_model_len"
            )
        self.runner = DecoderRunner(model, num_kv_blocks, block_size, lora)
        self.image_inputs = image_inputs  # a vision-language model's image placeholders (None: no images)
        self.speech = speech  # a speech-to-text model's limits (None: not one); each request has one audio window
        self.lora = lora  # LoRA adapters (engine.lora), with --enable-lora
        self.config = model.config
        self.tasks = tasks
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.kv_cache = self.runner.kv_cache
        self.kv = KVCacheManager(num_kv_blocks, block_size, enable_prefix_caching)
        # while decodes run, a step may take at most max_step_ratio x a loaded decode step (engine.step_budget)
        self.step_budget = StepBudget(max_num_batched_tokens, max_step_ratio)
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs,
            max_num_batched_tokens,
            prefill_limit=self.step_budget.prefill_tokens if self.step_budget.enabled else None,
            max_loras=lora.max_loras if lora is not None else None,
        )
        # structured output: guides compile off this thread; a request waits here until its guide is
        # ready (future done), while the others keep stepping (engine.structured.compiler)
        self.guides = guides
        self.awaiting_guides: dict[str, tuple[Generate, int, Future[CompiledGuide]]] = {}
        self.max_num_queued_requests = max_num_queued_requests
        self.max_num_queued_tokens = max_num_queued_tokens
        self.max_queue_seconds = max_queue_seconds  # a request not scheduled by then fails (503)
        self.latency: LatencyObserver | None = None  # request latencies for metrics (engine.latency)
        self._arrived_at: dict[str, float] = {}  # requests waiting for a guide: when they arrived
        self._faulted = False  # the last forward pass failed and a lone request was blamed for it
        self._step_at = 0.0  # when this step's tokens were produced (one clock read per step)
        # a model's own decoding rules (Whisper's suppressions and timestamp rules) go first, as in transformers
        processors = [*model_rules, *builtin_processors(guides)]
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(seed), processors)
        # n-gram speculative decoding (engine.spec_decode); None: off
        self.speculator = Speculator(speculative_config, max_model_len) if speculative_config else None
        self.requests: dict[str, RequestState] = {}
        self.beams = BeamSearchDriver(self)  # beam-search requests' rounds (engine.beam_search)
        self._best_of: dict[str, BestOfCollector] = {}  # requests whose candidates' events are held back
        self.encodes: dict[str, tuple[Encode, ScheduledSequence]] = {}  # pooling requests in flight
        self._arrivals = itertools.count()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._stats = EngineStats()

    # ---- state ----

    @property
    def has_work(self) -> bool:
        return bool(self.requests) or bool(self.encodes) or self._guide_ready()

    def _guide_ready(self) -> bool:
        return any(future.done() for _, _, future in self.awaiting_guides.values())

    def wait_for_guides(self, timeout: float | None = None) -> None:
        """Block until some awaited guide is compiled (offline use: nothing else to do meanwhile)."""
        futures = [future for _, _, future in self.awaiting_guides.values()]
        if futures:
            wait(futures, timeout, return_when=FIRST_COMPLETED)

    def stats(self) -> EngineStats:
        """The numbers as of the end of the last `add` or `step` (safe to read from another thread)."""
        return self._stats

    def _refresh_stats(self) -> None:
        scheduler = self.scheduler
        spec = self.speculator
        self._stats = EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting + len(self.awaiting_guides),
            kv_cache_usage=self.kv.pool.usage(),
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            spec_decode_num_drafts=spec.num_drafts if spec else 0,
            spec_decode_num_draft_tokens=spec.num_draft_tokens if spec else 0,
            spec_decode_num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            spec_decode_num_accepted_tokens_per_pos=tuple(spec.accepted_per_pos) if spec else (),
        )

    # ---- commands ----

    def add(self, commands: Iterable[Command]) -> list[Event]:
        """Take commands in order; returns the immediate events (failures, max_tokens=0 answers)."""
        events: list[Event] = []
        for command in commands:
            if isinstance(command, Generate):
                events.extend(self._add_generate(command))
            elif isinstance(command, Abort):
                self._abort(command)
            elif isinstance(command, Encode):
                events.extend(self._add_encode(command))
            elif isinstance(command, LoadAdapter | UnloadAdapter):
                events.append(self._change_adapters(command))
        self._refresh_stats()
        return events

    def _change_adapters(self, command: LoadAdapter | UnloadAdapter) -> Event:
        """Load (read and check the folder, on this thread, as vLLM does) or unload a LoRA adapter."""
        if self.lora is None:
            return Failed(command.request_id, 400, "LoRA adapters are not enabled; start the server with --enable-lora")
        if isinstance(command, UnloadAdapter):
            if not self.lora.unregister(command.name):
                return Failed(command.request_id, 404, f"The lora adapter '{command.name}' cannot be found.")
            return AdapterUnloaded(command.request_id, command.name)
        try:
            adapter = self.lora.register(command.name, command.path, replace=command.replace)
        except AdapterError as error:
            return Failed(command.request_id, 400, str(error))
        return AdapterLoaded(command.request_id, command.name, adapter.path)

    def _running(self, request_id: str) -> list[Event]:
        if request_id in self.requests or request_id in self.encodes or request_id in self.awaiting_guides:
            return [Failed(request_id, 400, f"request id {request_id!r} is already running")]
        return []

    def _add_encode(self, command: Encode) -> list[Event]:
        """A decoder embedding model: one prefill-only sequence, pooled from its last token. A
        vision-language model's images ride on the sequence, as a `Generate`'s do: the runner embeds
        them and the prefix cache keys their blocks by them."""
        if "generate" in self.tasks:
            return [Failed(command.request_id, 400, "this model generates text; it does not serve embeddings")]
        if refused := self._running(command.request_id):
            return refused
        try:
            check_pooling(
                command, self.tasks, self.config.vocab_size, self.max_model_len, self.config.hidden_size
            )
            check_media(command.prompt_token_ids, command.media, self.image_inputs)
        except RequestRejected as error:
            return [Failed(command.request_id, error.status, str(error))]
        seq = ScheduledSequence(
            command.request_id,
            0,
            list(command.prompt_token_ids),
            None,
            command.priority,
            arrival=next(self._arrivals),
            salt=command.cache_salt,
            prefill_only=True,
            media=command.media,
        )
        self.encodes[command.request_id] = (command, seq)
        self.scheduler.add(seq)
        return []

    def _add_generate(self, command: Generate) -> list[Event]:
        if not self.tasks & {"generate", "transcription"}:
            return [Failed(command.request_id, 400, "this model does not generate text")]
        if refused := self._running(command.request_id):
            return refused
        try:
            max_tokens = validate(command, self.config.vocab_size, self.max_model_len, self.max_num_seqs)
            if self.speech is not None:
                check_audio(command.media, int(self.speech.sample_rate * self.speech.window_seconds))
            else:
                check_media(command.prompt_token_ids, command.media, self.image_inputs)
        except RequestRejected as error:
            return [Failed(command.request_id, error.status, str(error))]
        if (busy := self._over_capacity(len(command.prompt_token_ids))) is not None:
            return [Failed(command.request_id, 503, busy)]
        self._arrived_at[command.request_id] = time.perf_counter()
        if command.params.structured is not None:
            if self.guides is None:
                return [Failed(command.request_id, 400, "this model does not support structured output")]
            future = self.guides.compile(command.params.structured)
            if not future.done():
                self.awaiting_guides[command.request_id] = (command, max_tokens, future)
                return []
            if (refused := _compile_failure(command.request_id, future)) is not None:
                self._arrived_at.pop(command.request_id, None)
                return [refused]
        return self._start_generate(command, max_tokens)

    def _over_capacity(self, prompt_tokens: int) -> str | None:
        """Why a new request is refused (engine.admission), or None; guides compiling count as queued."""
        waiting_guides = self.awaiting_guides.values()
        return over_capacity(
            self.scheduler.num_waiting + len(self.awaiting_guides),
            self.scheduler.num_waiting_tokens + sum(len(command.prompt_token_ids) for command, _, _ in waiting_guides),
            prompt_tokens,
            max_num_queued_requests=self.max_num_queued_requests,
            max_num_queued_tokens=self.max_num_queued_tokens,
        )

    def _admit_compiled(self) -> list[Event]:
        """Start the requests whose guide is now compiled (or fail those whose guide cannot be)."""
        events: list[Event] = []
        for request_id, (command, max_tokens, future) in list(self.awaiting_guides.items()):
            if future.done():
                del self.awaiting_guides[request_id]
                refused = _compile_failure(request_id, future)
                if refused is not None:
                    self._arrived_at.pop(request_id, None)
                events.extend([refused] if refused is not None else self._start_generate(command, max_tokens))
        return events

    def _start_generate(self, command: Generate, max_tokens: int) -> list[Event]:
        params = command.params
        adapter, salt = None, command.cache_salt
        if command.lora_name is not None:
            adapter = self.lora.uid_of(command.lora_name) if self.lora is not None else None
            if adapter is None:
                return [Failed(command.request_id, 404, f"The model `{command.lora_name}` does not exist.")]
            salt = f"{salt or ''}\x00lora:{adapter}"  # an adapter's blocks are its own in the prefix cache
        if self.speech is not None:  # every decoder position attends to the audio: it keys every block
            salt = f"{salt or ''}\x00audio:{command.media[0].hash}"
        # sequences to start: n samples, best_of candidates, or the first beam (beams fork later)
        width = num_candidates(params)
        started = 1 if params.use_beam_search else width
        request = RequestState(
            command.request_id,
            tuple(command.prompt_token_ids),
            params,
            command.priority,
            next(self._arrivals),
            max_tokens,
            live_indices=set(range(started if max_tokens > 0 else params.n)),
            added_at=self._arrived_at.pop(command.request_id, time.perf_counter()),
        )
        if params.use_beam_search:
            request.beam = BeamSearch(params, max_tokens, self.eos_token_ids)
        elif width > params.n and max_tokens > 0:
            request.best_of = self._best_of[request.request_id] = BestOfCollector(params.n, width)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        if max_tokens == 0 and not request.scoring_prompt:
            self._count_prompt(request)
            return self._finish_without_tokens(request)  # nothing to compute
        self.requests[request.request_id] = request
        # max_tokens=0: one prefill-only sequence scores the prompt; otherwise one sequence per sample.
        indices = range(started) if max_tokens > 0 else [0]
        prompt = list(request.prompt_token_ids)
        for index in indices:
            seq = ScheduledSequence(
                request.request_id,
                index,
                prompt,
                params,
                command.priority,
                arrival=request.arrival,
                salt=salt,
                read_prefix_cache=not request.scoring_prompt,
                prefill_only=max_tokens == 0,
                lora=adapter,
                media=command.media,
            )
            request.samples[index] = SampleState(seq, self._generator(request, index))
            if max_tokens > 0:  # its logits processors' state, from now to its release
                self.sampler.admit(seq.seq_id, params, prompt, self.eos_token_ids)
            self.scheduler.add(seq)
        return []

    def _abort(self, command: Abort) -> None:
        """Drop a request or one sample, silently (the protocol side already knows); blocks free at once."""
        if self.awaiting_guides.pop(command.request_id, None) is not None:
            self._arrived_at.pop(command.request_id, None)
            return
        encode = self.encodes.pop(command.request_id, None)
        if encode is not None:
            self.scheduler.finish(encode[1])
            return
        request = self.requests.get(command.request_id)
        if request is None:
            return
        if command.index is None:
            self._drop(request)
            return
        if request.grouped:  # the client never saw these samples by index: nothing to abort
            return
        request.live_indices.discard(command.index)
        sample = request.samples.pop(command.index, None)
        if sample is not None:
            self.scheduler.finish(sample.seq)
            self.sampler.release(sample.seq.seq_id)
        if not request.live_indices:
            self._drop(request)

    def _drop(self, request: RequestState) -> None:
        for sample in request.samples.values():
            self.scheduler.finish(sample.seq)
            self.sampler.release(sample.seq.seq_id)
        request.samples.clear()
        self.requests.pop(request.request_id, None)
        self._best_of.pop(request.request_id, None)

    def fail_all(self, status: int, message: str) -> list[Event]:
        """Fail every live request (the engine is going away)."""
        events: list[Event] = [
            Failed(rid, status, message) for rid in [*self.requests, *self.encodes, *self.awaiting_guides]
        ]
        self.awaiting_guides.clear()
        self._arrived_at.clear()
        for request in list(self.requests.values()):
            self._drop(request)
        for _, seq in self.encodes.values():
            self.scheduler.finish(seq)
        self.encodes.clear()
        self._refresh_stats()
        return events

    # ---- one step ----

    def step(self) -> list[Event]:
        admitted = self._expire_queued(time.perf_counter()) if self.max_queue_seconds is not None else []
        admitted += self._admit_compiled() if self.awaiting_guides else []
        drafts = None
        if self.speculator is not None:  # draft tokens for decoding sequences (engine.spec_decode)
            drafts = self.speculator.propose(self.scheduler.running, self._max_tokens_of)
        scheduled = self.scheduler.schedule(drafts)
        for seq in scheduled.preempted:
            self.sampler.preempt(seq.seq_id)
        chunks = scheduled.chunks
        events: list[Event] = []
        if chunks:
            # a drafted decode is 1 + k decode rows (engine.step_budget)
            decodes = sum(1 + len(c.draft) for c in chunks if c.start >= c.seq.num_prompt_tokens)
            prefill_tokens = sum(c.num_tokens for c in chunks if c.start < c.seq.num_prompt_tokens)
            started = time.perf_counter()
            with torch.inference_mode():
                events = self._run(chunks)
            seconds = time.perf_counter() - started
            self.step_budget.observe(decodes, prefill_tokens, seconds)
            if self.speculator is not None and not prefill_tokens:  # it learns what a row costs
                self.speculator.observe(decodes, seconds)
        self._refresh_stats()
        return admitted + events

    def _spans(self, chunks: list[ScheduledChunk]) -> list[SequenceSpan]:
        return [
            SequenceSpan(c.input_token_ids(), c.start, self.kv.block_ids(c.seq.seq_id), c.seq.media)
            for c in chunks
        ]

    def _run(self, chunks: list[ScheduledChunk]) -> list[Event]:
        self._mark_scheduled(chunks, time.perf_counter())
        spans = self._spans(chunks)
        self.runner.copy_blocks(self.kv.take_copies())  # forked beams' copy on write, before any write
        failed: list[Event] = []
        try:
            step = self.runner.forward(spans, [c.seq.lora for c in chunks])
        except Exception as error:
            chunks, failed = self._fail_culprits(chunks, spans, error)
            if not chunks:
                return failed
            spans = self._spans(chunks)
            # a failure now is engine-wide: the engine restarts the core
            step = self.runner.forward(spans, [c.seq.lora for c in chunks])
        self._faulted = False
        self._step_at = time.perf_counter()  # the tokens of this step exist from here (engine.latency)
        hidden = step.hidden
        self.scheduler.advance(chunks)

        events: list[Event] = failed
        sampling: list[tuple[int, RequestState, SampleState]] = []  # (hidden row, owner)
        verifying: list[tuple[int, RequestState, SampleState, Draft]] = []  # (first row, owner, draft)
        pooling: list[tuple[int, Encode]] = []  # (row of the last prompt token, request)
        for chunk, end in zip(chunks, step.ends, strict=True):
            encode = self.encodes.get(chunk.seq.request_id)
            if encode is not None:
                if chunk.samples:  # the whole prompt is computed
                    pooling.append((end - 1, encode[0]))
                continue
            request = self.requests[chunk.seq.request_id]
            if request.num_cached_tokens is None:
                request.num_cached_tokens = chunk.seq.num_cached_tokens
            if request.scoring_prompt:
                self._score_prompt(request, chunk, hidden[end - chunk.num_tokens : end])
            if not chunk.samples:
                continue
            if chunk.seq.prefill_only:  # max_tokens=0: the prompt is all there is
                self._count_prompt(request)
                self._drop(request)
                events.extend(self._finish_without_tokens(request))
            elif chunk.draft:
                first = end - chunk.num_tokens
                verifying.append((first, request, request.samples[chunk.seq.index], chunk.draft))
            else:
                sampling.append((end - 1, request, request.samples[chunk.seq.index]))
        if pooling:
            events.extend(self._pool(hidden, pooling))
        if sampling:
            events.extend(self._sample(hidden, sampling))
        if verifying:
            events.extend(self._verify(hidden, verifying))
        return self._hold_best_of(events) if self._best_of else events

    def _fail_culprits(
        self, chunks: list[ScheduledChunk], spans: list[SequenceSpan], error: Exception
    ) -> tuple[list[ScheduledChunk], list[Event]]:
        """After a failed forward pass: fail only the requests that fail it alone (engine.fault_isolation)
        and return the other chunks, or re-raise `error` when no request can be blamed (every one
        fails alone, none does, or the step before failed too): then the engine restarts the core."""
        by_request: dict[str, list[tuple[SequenceSpan, int | None]]] = {}
        for chunk, span in zip(chunks, spans, strict=True):
            by_request.setdefault(chunk.seq.request_id, []).append((span, chunk.seq.lora))
        if self._faulted:
            raise error
        if len(by_request) == 1:  # alone already: blamed once; a second fault in a row is engine-wide
            culprits = set(by_request)
            self._faulted = True
        else:
            culprits = requests_failing_alone(
                lambda pairs: self.runner.forward([s for s, _ in pairs], [a for _, a in pairs]), by_request
            )
            if not culprits or culprits == set(by_request):
                raise error
        logger.error(
            "a forward pass failed (%s: %s); failing the request(s) that fail it alone: %s",
            type(error).__name__,
            error,
            ", ".join(sorted(culprits)),
            exc_info=error,
        )
        failed: list[Event] = []
        for request_id in culprits:
            self._fail_one(request_id)
            failed.append(Failed(request_id, 500, f"Internal server error while serving request {request_id}."))
        return [c for c in chunks if c.seq.request_id not in culprits], failed

    def _fail_one(self, request_id: str) -> None:
        encode = self.encodes.pop(request_id, None)
        if encode is not None:
            self.scheduler.finish(encode[1])
        request = self.requests.get(request_id)
        if request is not None:
            self._drop(request)

    def _hold_best_of(self, events: list[Event]) -> list[Event]:
        """best_of candidates' events wait in their collector; the n chosen come out when all finish."""
        out: list[Event] = []
        for event in events:
            collector = self._best_of.get(event.request_id) if isinstance(event, Tokens) else None
            if collector is None:
                out.append(event)
                continue
            chosen = collector.collect(event)
            if chosen:
                del self._best_of[event.request_id]
                out.extend(chosen)
        return out

    def _pool(self, hidden: torch.Tensor, pooling: list[tuple[int, Encode]]) -> list[Event]:
        vectors = self.runner.embed_last(hidden, [row for row, _ in pooling], [e.params for _, e in pooling])
        events: list[Event] = []
        for (_, encode), vector in zip(pooling, vectors, strict=True):
            _, seq = self.encodes.pop(encode.request_id)
            self.scheduler.finish(seq)
            self._prompt_tokens_total += len(encode.prompt_token_ids)
            events.append(Pooled(encode.request_id, tuple(vector.tolist()), len(encode.prompt_token_ids)))
        return events

    def _sample(
        self, hidden: torch.Tensor, sampling: list[tuple[int, RequestState, SampleState]]
    ) -> list[Event]:
        """Logits only for the rows that sample; one token each."""
        events: list[Event] = []
        beam_rows = [entry for entry in sampling if entry[1].beam is not None]
        if beam_rows:  # beam search ranks candidates instead of drawing (engine.beam_search)
            sampling = [entry for entry in sampling if entry[1].beam is None]
            events = self.beams.step(hidden, beam_rows)
            if not sampling:
                return events
        logits = self.runner.logits(hidden, [row for row, _, _ in sampling])
        result = self.sampler(logits, [self._row(request, sample) for _, request, sample in sampling])
        return events + [
            self._advance(request, sample, [token], [logprob], [top])
            for (_, request, sample), token, logprob, top in zip(
                sampling, result.token_ids, result.logprobs, result.top_logprobs, strict=True
            )
        ]

    def _verify(
        self, hidden: torch.Tensor, verifying: list[tuple[int, RequestState, SampleState, Draft]]
    ) -> list[Event]:
        """Decodes that carried a draft: k + 1 logits rows each, verified together (engine.spec_decode)."""
        assert self.speculator is not None
        rows = [first + i for first, _, _, draft in verifying for i in range(len(draft) + 1)]
        logits = self.runner.logits(hidden, rows)
        drafted = [DraftedRow(self._row(request, sample), draft) for _, request, sample, draft in verifying]
        events: list[Event] = []
        for (_, request, sample, draft), result in zip(
            verifying, verify(self.sampler, logits, drafted), strict=True
        ):
            self.speculator.record(len(draft), result.num_accepted)
            tokens, logprobs, tops = result.token_ids, result.logprobs, result.top_logprobs
            events.append(self._advance(request, sample, tokens, logprobs, tops))
            self.scheduler.accept_draft(sample.seq, result.num_accepted)  # no-op once finished
        return events

    def _advance(
        self,
        request: RequestState,
        sample: SampleState,
        tokens: Sequence[int],
        logprobs: Sequence[float],
        tops: Sequence[TokenLogprobs | None],
    ) -> Tokens:
        """Append this step's tokens (several after speculative verification) in order, up to the
        first that finishes the sample; tokens after it are dropped."""
        finished = None
        kept = 0
        for token, logprob in zip(tokens, logprobs, strict=True):
            sample.output_token_ids.append(token)
            sample.cumulative_logprob += logprob
            kept += 1
            finished = finish_check(token, sample, request, self.eos_token_ids)
            if finished:
                break
        self.sampler.accept(sample.seq.seq_id, tokens[:kept])
        self._generation_tokens_total += kept
        self._count_prompt(request)
        event = Tokens(
            request.request_id,
            sample.index,
            tuple(tokens[:kept]),
            request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            logprobs=None if tops[0] is None else tuple(tops[:kept]),
            prompt_logprobs=None if sample.sent_first_event else _frozen(request.prompt_logprobs),
            finish_reason=finished[0] if finished else None,
            stop_reason=finished[1] if finished else None,
            cumulative_logprob=sample.cumulative_logprob,
        )
        sample.sent_first_event = True
        if self.latency is not None and kept:
            self._observe_tokens(request, sample)
        if finished:
            self.scheduler.finish(sample.seq)
            self.sampler.release(sample.seq.seq_id)
            del request.samples[sample.index]
            request.live_indices.discard(sample.index)
            if not request.live_indices:
                self.requests.pop(request.request_id, None)
                if self.latency is not None:
                    self.latency.end_to_end(self._step_at - request.added_at)
        return event

    def _mark_scheduled(self, chunks: list[ScheduledChunk], now: float) -> None:
        """Stamp requests scheduled for the first time (queue time, and the queue timeout's end)."""
        for chunk in chunks:
            request = self.requests.get(chunk.seq.request_id)
            if request is not None and request.scheduled_at is None:
                request.scheduled_at = now
                if self.latency is not None:
                    self.latency.queue_time(now - request.added_at)

    def _expire_queued(self, now: float) -> list[Event]:
        """Requests that waited longer than `max_queue_seconds` without being scheduled fail with a
        503: a client that would have given up by then is told so instead of served late."""
        limit = self.max_queue_seconds
        assert limit is not None
        message = "The request waited more than {:g} s to be scheduled (--max-queue-time); retry later."
        events: list[Event] = []
        for request in [r for r in self.requests.values() if r.scheduled_at is None and now - r.added_at > limit]:
            self._drop(request)
            events.append(Failed(request.request_id, 503, message.format(limit)))
        for request_id in [rid for rid in self.awaiting_guides if now - self._arrived_at.get(rid, now) > limit]:
            del self.awaiting_guides[request_id]
            self._arrived_at.pop(request_id, None)
            events.append(Failed(request_id, 503, message.format(limit)))
        return events

    def _observe_tokens(self, request: RequestState, sample: SampleState) -> None:
        now = self._step_at
        if request.first_token_at is None:
            request.first_token_at = now
            self.latency.time_to_first_token(now - request.added_at)
        if sample.last_token_at is not None:
            self.latency.inter_token(now - sample.last_token_at)
        sample.last_token_at = now

    def _finish_without_tokens(self, request: RequestState) -> list[Event]:
        return [
            Tokens(
                request.request_id,
                index,
                (),
                request.num_prompt_tokens,
                num_cached_tokens=request.num_cached_tokens or 0,
                prompt_logprobs=_frozen(request.prompt_logprobs),
                finish_reason="length",
            )
            for index in sorted(request.live_indices)
        ]

    # ---- helpers ----

    def _score_prompt(self, request: RequestState, chunk: ScheduledChunk, hidden: torch.Tensor) -> None:
        """Extend the request's prompt logprobs with the positions this chunk computed.

        Row r of `hidden` is position `chunk.start + r`, whose logits score the prompt token after
        it. Scored a few rows at a time so a long prompt never holds [prompt, vocab] logits at once.
        While scoring, the request's sequences skip the prefix cache, so chunks arrive contiguously.
        """
        entries, prompt = request.prompt_logprobs, request.prompt_token_ids
        if entries is None:
            return
        first = len(entries) - 1  # position whose output scores the next missing entry
        last = min(chunk.start + chunk.num_tokens, len(prompt) - 1)  # positions up to last - 1
        if first < chunk.start or first >= last:
            return
        k = request.params.prompt_logprobs or 0
        for start in range(first, last, _PROMPT_LOGPROBS_CHUNK):
            stop = min(start + _PROMPT_LOGPROBS_CHUNK, last)
            logits = self.runner.logits(hidden[start - chunk.start : stop - chunk.start])
            entries.extend(prompt_logprobs(logits, prompt[start + 1 : stop + 1], k))
        if not request.scoring_prompt:  # complete: the samples may now share cached blocks
            for sample in request.samples.values():
                sample.seq.read_prefix_cache = True

    def _count_prompt(self, request: RequestState) -> None:
        if not request.prompt_counted:
            request.prompt_counted = True
            self._prompt_tokens_total += request.num_prompt_tokens

    def _max_tokens_of(self, seq: ScheduledSequence) -> int:
        """The most output tokens `seq` may have (its request's max_tokens, capped by the context)."""
        return self.requests[seq.request_id].max_tokens

    def _row(self, request: RequestState, sample: SampleState) -> SamplingRow:
        return SamplingRow(
            request.params,
            request.prompt_token_ids,
            sample.output_token_ids,
            self.eos_token_ids,
            sample.generator,
            key=sample.seq.seq_id,
        )

    def _generator(self, request: RequestState, index: int) -> torch.Generator | None:
        """Sample `index` of a seeded request draws from seed + index (as vLLM's n>1 children do)."""
        if request.params.seed is None:
            return None
        return torch.Generator(self.device).manual_seed(request.params.seed + index)


def _frozen(entries: Sequence | None) -> tuple | None:
    return None if entries is None else tuple(entries)


def _compile_failure(request_id: str, future: Future[CompiledGuide]) -> Failed | None:
    """The 400 for a constraint that cannot compile (None: it compiled)."""
    error = future.exception()
    if error is None:
        return None
    status = 400 if isinstance(error, ConstraintError) else 500
    return Failed(request_id, status, str(error))
