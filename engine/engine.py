"""The engine thread: drains an inbox of commands, steps the models, hands each step's events to callbacks.

One `Engine` per served model; several may share one `EngineThread` (`load_engines`). The runtime
bridges (asyncio, trio) give each engine's `start` a callback that wakes their loop; everything
crosses the thread boundary as the msgspec structs of `protocol.engine_api`. If the loop dies,
every pending request of every model on it gets `Failed(..., 500, ...)`, `healthy` turns False,
and later submits fail at once.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

import kernels
from engine.allocator import keep_step_buffers
from engine.attention import PagedKVCache
from engine.core import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineCore, EngineStats
from engine.encoder_core import EncoderCore
from engine.loader import LoadedModel, PoolingFacts, load_model, resolve_device, resolve_weight_storage
from engine.lora import LoRAManager
from engine.model_files import DEFAULT_MODEL, resolve_model
from engine.model_runner import EncoderRunner
from engine.processors.whisper import whisper_rules
from engine.registry import Convert
from engine.requests import image_inputs
from engine.spec_decode import SpeculativeConfig, parse_speculative_config
from engine.structured import GuideCompiler
from engine.tokenizer import HFTokenizer
from kernels.quantized import set_default_activations
from protocol.engine_api import Command, Encode, Event, Failed, Generate
from protocol.media.spec import MultimodalSpec, SpeechSpec

logger = logging.getLogger(__name__)

EventCallback = Callable[[list[Event]], None]
_STOP = object()
_WAKE = object()  # a compiler worker's nudge: a guide is ready

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in float32


# On by default: with the step's fixed cost learned (engine.step_budget) and the ratio taken against
# a decode step at the present load, 2.5 held ITL p99 at 2.5x its p50 (unbounded: 6.4x) for 5% of
# output tok/s at 32 closed-loop streams on a 2-core CPU (bench/RESULTS.md, "Step budget"). 0 turns
# it off (only max_num_batched_tokens bounds a step, as vLLM).
DEFAULT_MAX_STEP_RATIO = 2.5


@dataclass(kw_only=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # a packaged model name, a .gguf file, or an HF folder
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    # "embed": serve a decoder model (or a classifier's backbone) as an embedding model (vLLM's --convert)
    convert: Convert = "auto"
    max_model_len: int | None = None  # default: the model's context length
    seed: int = 0
    max_num_seqs: int = 256
    # tokens per step (chunked prefill); None: 512 for decoders (see engine.core), 2048 for encoders
    max_num_batched_tokens: int | None = None
    # while sequences decode, a step that also prefills prompts may take at most this many times a
    # decode-only step (engine.step_budget); 0 or 1: no limit but max_num_batched_tokens
    max_step_ratio: float = DEFAULT_MAX_STEP_RATIO
    # KV cache size in bytes (an int, or a string such as "1GiB" or "512M"); default 1 GiB, never more
    # blocks than max_num_seqs sequences of max_model_len tokens can use
    kv_cache_memory: int | str | None = None
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests, tuning)
    block_size: int = DEFAULT_BLOCK_SIZE
    enable_prefix_caching: bool = True
    progress: bool = True  # show a loading progress bar on stderr
    # torch intra-op threads on CPU. 0: leave torch's setting alone; None: all cores but one (which
    # stays free for the event loop); n: n threads. The setting is process-wide.
    num_threads: int | None = 0
    # kernels whose result for a row does not depend on the rest of the batch (process-wide, slower)
    batch_invariant: bool = False
    # GGUF weights stay in their quantized blocks (False: dequantized to `dtype` at load, as --dequantize)
    keep_quantized: bool = True
    # the quantized matmuls' activations for few rows: "float" (exact up to float32 rounding) or "int8"
    # (llama.cpp's scheme: faster with VNNI, but greedy output parts from the float model's); process-wide
    quantized_activations: Literal["float", "int8"] = "float"
    # speculative decoding: a SpeculativeConfig, its JSON text or mapping in vLLM's shape
    # ({"method": "ngram", "num_speculative_tokens": 4, ...}, see engine.spec_decode); None: off
    speculative_config: SpeculativeConfig | str | dict[str, Any] | None = None
    # admission control: a request that finds this many requests (or prompt tokens) already waiting
    # to be scheduled is refused at once with a 503 (None: no limit)
    max_num_queued_requests: int | None = None
    max_num_queued_tokens: int | None = None
    # a request not yet scheduled after this many seconds fails with a 503 (None: it waits)
    max_queue_seconds: float | None = None
    # LoRA adapters (engine.lora), as vLLM's --enable-lora, --max-loras, --max-lora-rank,
    # --max-cpu-loras; `lora_modules` maps names to PEFT adapter folders loaded at start
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_modules: dict[str, str] | None = None

    def __post_init__(self) -> None:
        # checked here, before any weights load, so a bad setting fails at once with its reason
        self.speculative_config = parse_speculative_config(self.speculative_config)


# Tokens per encoder step. An encoder input runs whole, so the budget only bounds how many inputs
# share a forward pass (and how long a step of a model sharing the thread waits).
DEFAULT_ENCODER_BATCHED_TOKENS = 2048


class EngineThread:
    """The one torch thread that serves the engines of one or several models.

    Why one thread for every model: each thread that runs torch ops on the CPU gets its own OpenMP
    team, and with two teams on a small machine libgomp stops spinning between parallel regions;
    decode steps then took ~45% longer (measured: 127 vs 87 ms for 32 sequences on 2 cores). Even an
    idle second model on its own thread cost SmolLM2's decode steps 10-20% at 32 sequences and ~30%
    at one, and nothing measurable on this shared thread (bench/RESULTS.md, "Two models on one
    machine"). So every model's engine posts its commands to this thread's inbox, and each turn of the loop
    steps every model that has work, one step each (round robin, so a busy model cannot starve
    another), and hands each model's events to that model's callback.
    """

    def __init__(self, name: str = "sansllm-engine") -> None:
        self.worker = _TorchThread(name)
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.lock = threading.Lock()  # orders submits against the thread's death
        self.engines: list[Engine] = []
        self.started = False
        self.alive = True  # False once the loop has died
        self.refusal = (503, "the engine is shut down")  # how submits are failed once not alive

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.worker.post(self._loop)

    def _loop(self) -> None:
        active = [engine for engine in self.engines if engine._alive]
        undelivered: dict[Engine, list[Event]] = {}
        try:
            while active:
                items = self._drain(block=not any(engine.core.has_work for engine in active))
                commands: dict[Engine, list[Command]] = {}
                for engine, item in items:
                    if item is _WAKE:
                        continue  # a guide is ready: this turn's has_work check admits it
                    if item is _STOP:
                        commands.pop(engine, None)
                        if engine in active:
                            active.remove(engine)
                            undelivered[engine] = engine.core.fail_all(503, "the engine is shutting down")
                    elif engine in active:
                        commands.setdefault(engine, []).append(item)
                    else:
                        undelivered.setdefault(engine, []).extend(_fail([item], *engine._refusal))
                for engine, batch in commands.items():
                    undelivered.setdefault(engine, []).extend(engine._guarded(engine.core.add, batch))
                for engine in active:
                    if engine.core.has_work:
                        undelivered.setdefault(engine, []).extend(engine._guarded(engine.core.step))
                for engine in list(undelivered):
                    events = undelivered.pop(engine)
                    if events and engine._on_events is not None:
                        engine._on_events(events)
        except BaseException as error:  # noqa: BLE001 - any death must fail the pending requests
            logger.exception("engine thread died")
            self._die(f"engine error: {type(error).__name__}: {error}", undelivered)

    def _drain(self, block: bool) -> list[tuple[Engine, Any]]:
        items: list[tuple[Engine, Any]] = []
        try:
            items.append(self.inbox.get() if block else self.inbox.get_nowait())
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            return items

    def _die(self, message: str, undelivered: dict[Engine, list[Event]]) -> None:
        """Fail everything still pending; events the dying step had already made go out first."""
        with self.lock:
            self.alive = False
            self.refusal = (500, message)
            leftovers = self._drain(block=False)
        for engine in self.engines:
            engine._alive = False
            engine._refusal = (500, message)
            pending = [item for owner, item in leftovers if owner is engine and item not in (_STOP, _WAKE)]
            events = undelivered.get(engine, []) + engine.core.fail_all(500, message) + _fail(pending, 500, message)
            if events and engine._on_events is not None:
                try:
                    engine._on_events(events)
                except Exception:  # noqa: BLE001 - nothing more we can do for them
                    logger.exception("could not deliver the engine's failure events")

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the thread once no engine on it is alive."""
        if not any(engine._alive for engine in self.engines):
            self.worker.stop(timeout)


def load_engines(configs: Sequence[EngineConfig]) -> list[Engine]:
    """Load several models that share one engine thread (see `EngineThread` for why)."""
    thread = EngineThread()
    engines: list[Engine] = []
    try:
        for config in configs:
            try:
                engines.append(Engine(config, thread=thread))
            except Exception as error:
                error.add_note(f"while loading model {config.model!r}")
                raise
    except BaseException:
        for engine in engines:
            engine.shutdown()
        thread.worker.stop()
        raise
    return engines


class Engine:
    """One model's engine: loads the model, then serves its commands on an `EngineThread`.

    Given no thread, it makes its own (one model per thread, as tests and offline use want).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        loaded: LoadedModel | None = None,
        *,
        thread: EngineThread | None = None,
    ):
        self.config = config = config or EngineConfig()
        if thread is not None and thread.started:
            # its worker runs the serving loop and would never get to the build
            raise RuntimeError("a model cannot join an engine thread that is already serving")
        self._thread = thread or EngineThread()
        try:
            self._thread.worker.call(lambda: self._build(config, loaded))
        except BaseException:
            if thread is None:
                self._thread.worker.stop()
            raise
        self._started = False
        self._on_events: EventCallback | None = None
        self._alive = True  # False once this engine (or its thread) has shut down or died
        self._refusal = (503, "the engine is shut down")  # how submits are failed once not alive
        self._restarting = False  # True while a failed core is rebuilt (/health answers 503)
        self.restarts = 0  # cores rebuilt after a failure
        self._thread.engines.append(self)

    def _build(self, config: EngineConfig, loaded: LoadedModel | None) -> None:
        _set_threads(config)
        keep_step_buffers()
        if config.batch_invariant:
            kernels.set_batch_invariant(True)
        set_default_activations(config.quantized_activations)
        source = loaded.source if loaded else resolve_model(config.model)
        if loaded is None:
            logger.info("loading %s from %s", source.name, source.path)
        loaded = loaded or load_model(
            source, config.dtype, config.device, config.progress, config.convert, config.keep_quantized
        )
        if not config.batch_invariant:
            loaded.model.pack_weights(resolve_weight_storage(config.dtype, loaded))
        kernels.prepare(next(loaded.model.parameters()).device)
        self.loaded = loaded
        self.tokenizer: HFTokenizer = loaded.tokenizer
        self.model_name = config.served_model_name or source.name
        self.root = str(source.path)
        self.vocab_size = loaded.config.vocab_size
        self.generation_defaults: dict[str, Any] = dict(loaded.generation_defaults)
        self.tasks: frozenset[str] = loaded.spec.tasks
        self.pooling: PoolingFacts | None = loaded.pooling
        self.multimodal: MultimodalSpec | None = loaded.multimodal  # what media the model takes
        self.speech: SpeechSpec | None = loaded.speech  # a speech-to-text model's tokens and limits
        if loaded.spec.kind == "encoder":
            self._build_encoder(config, loaded)
        else:
            self._build_decoder(config, loaded)

    def _build_decoder(self, config: EngineConfig, loaded: LoadedModel, lora: LoRAManager | None = None) -> None:
        """The decoder's core; `lora`: the adapters of the core it replaces (their registrations go on)."""
        max_model_len = _max_model_len(config.max_model_len, loaded)
        num_kv_blocks = _num_kv_blocks(config, loaded, max_model_len)
        self.max_model_len = _fit_in_cache(max_model_len, num_kv_blocks * config.block_size, config)
        self.core = EngineCore(
            loaded.model,
            self.tokenizer.eos_token_ids,
            self.max_model_len,
            num_kv_blocks=num_kv_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
            enable_prefix_caching=config.enable_prefix_caching,
            seed=config.seed,
            tasks=self.tasks,
            max_step_ratio=config.max_step_ratio,
            speculative_config=parse_speculative_config(config.speculative_config),
            guides=GuideCompiler(self.tokenizer, on_ready=self._wake),
            max_num_queued_requests=config.max_num_queued_requests,
            max_num_queued_tokens=config.max_num_queued_tokens,
            max_queue_seconds=config.max_queue_seconds,
            lora=self._lora_manager(config, loaded, lora),
            image_inputs=image_inputs(loaded.multimodal),
            speech=loaded.speech,
            model_rules=[rules] if (rules := whisper_rules(loaded)) is not None else [],
        )

    def _lora_manager(self, config: EngineConfig, loaded: LoadedModel, old: LoRAManager | None) -> LoRAManager | None:
        if not config.enable_lora:
            if config.lora_modules:
                raise ValueError("--lora-modules needs --enable-lora")
            return None
        if "generate" not in loaded.spec.tasks:
            if config.lora_modules:
                raise ValueError("LoRA adapters are served on generative models only")
            return None  # --enable-lora reaches every model: an embedding model simply takes none
        if loaded.multimodal is not None:
            if config.lora_modules:
                raise ValueError("LoRA adapters are not served on vision-language models yet")
            return None
        manager = LoRAManager(
            loaded.model,
            loaded.config,
            max_loras=config.max_loras,
            max_rank=config.max_lora_rank,
            max_cpu_loras=config.max_cpu_loras,
        )
        if old is not None:
            manager.adopt(old)
            return manager
        for name, path in (config.lora_modules or {}).items():
            manager.register(name, path)
        return manager

    @property
    def lora_enabled(self) -> bool:
        return getattr(self.core, "lora", None) is not None

    @property
    def lora_adapters(self) -> dict[str, str]:
        """The LoRA adapters served now: name -> folder."""
        manager = getattr(self.core, "lora", None)
        return {} if manager is None else {name: r.path for name, r in manager.registered.items()}

    def _build_encoder(self, config: EngineConfig, loaded: LoadedModel) -> None:
        limit = loaded.max_model_len or loaded.config.max_model_len
        if config.max_model_len is not None and config.max_model_len > loaded.config.max_model_len:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's limit of "
                f"{loaded.config.max_model_len} tokens"
            )
        self.max_model_len = config.max_model_len or limit
        pooling = loaded.pooling
        assert pooling is not None
        self.core = EncoderCore(
            EncoderRunner(loaded.model, pooling.method, pooling.normalize, loaded.config.problem_type),
            tasks=self.tasks,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens or DEFAULT_ENCODER_BATCHED_TOKENS,
            hidden_size=pooling.hidden_size,
            num_type_ids=max(1, loaded.config.type_vocab_size),
            max_num_queued_requests=config.max_num_queued_requests,
            max_num_queued_tokens=config.max_num_queued_tokens,
        )

    # ---- the thread ----

    @property
    def healthy(self) -> bool:
        return self._alive and self._thread.alive and not self._restarting

    def _guarded(self, work: Callable[..., list[Event]], *args: Any) -> list[Event]:
        """Run a core call on the engine thread; an exception fails this model's in-flight requests
        and restarts its core instead of killing the thread (and every other model with it)."""
        try:
            return work(*args)
        except Exception as error:  # noqa: BLE001 - the requests fail, the server goes on
            return self._restart_core(error)

    def _restart_core(self, error: Exception) -> list[Event]:
        """A fresh core over the loaded weights (KV cache, scheduler and sampler state rebuilt: a
        failed step may have left them half-updated). /health is 503 while it is rebuilt. Clients
        get a generic message with their request id; the traceback goes to the log."""
        self._restarting = True
        try:
            old = self.core
            request_ids = [*old.requests, *getattr(old, "encodes", {}), *getattr(old, "awaiting_guides", {})]
            logger.error(
                "%s: the engine failed (%s: %s) while serving %d request(s); failing them and restarting it",
                self.model_name,
                type(error).__name__,
                error,
                len(request_ids),
                exc_info=error,
            )
            events: list[Event] = [
                Failed(rid, 500, f"Internal server error while serving request {rid}; the engine was restarted.")
                for rid in request_ids
            ]
            latency = getattr(old, "latency", None)
            guides = getattr(old, "guides", None)
            if guides is not None:
                guides.close()
            if self.loaded.spec.kind == "encoder":
                self._build_encoder(self.config, self.loaded)
            else:
                self._build_decoder(self.config, self.loaded, getattr(old, "lora", None))
            if latency is not None:
                self.observe_latency(latency)
            self.restarts += 1
            return events
        finally:
            self._restarting = False

    def stats(self) -> EngineStats:
        """Scheduler and KV cache numbers for metrics, as of the last step (any thread may call it)."""
        return self.core.stats()

    def observe_latency(self, observer: Any) -> None:
        """Report request latencies (`engine.latency.LatencyObserver`) from now on; called on the
        engine thread. Pooling engines have none to report."""
        if hasattr(self.core, "latency"):
            self.core.latency = observer

    def start(self, on_events: EventCallback) -> None:
        """Start serving; `on_events` is called on the engine thread once per step with this model's events."""
        if self._started:
            raise RuntimeError("engine already started")
        self._started = True
        self._on_events = on_events
        self._thread.start()

    def submit(self, commands: Iterable[Command]) -> None:
        """Enqueue commands (thread-safe, returns at once). A dead engine fails them right away."""
        commands = list(commands)
        with self._thread.lock:
            if self._alive and self._thread.alive:
                for command in commands:
                    self._thread.inbox.put((self, command))
                return
        refusal = self._refusal if not self._alive else self._thread.refusal
        failures = _fail(commands, *refusal)
        if failures and self._on_events is not None:
            self._on_events(failures)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop serving; requests still running get `Failed(503)`. The thread stops with its last engine."""
        with self._thread.lock:
            was_alive, self._alive = self._alive, False
        if was_alive and self._thread.started and self._thread.alive:
            self._thread.inbox.put((self, _STOP))
        self._thread.close(timeout)
        guides = getattr(self.core, "guides", None)
        if guides is not None:  # queued compiles are dropped; one running finishes on its own
            guides.close()

    # ---- offline use ----

    def generate_sync(self, commands: Iterable[Command]) -> list[Event]:
        """Run commands to completion (offline use, benchmarks, tests), on the engine's thread.

        Not for use while the engine thread is running.
        """
        if self._thread.started:
            raise RuntimeError("generate_sync cannot run while the engine thread is started")
        return self._thread.worker.call(lambda: self._run_to_completion(list(commands)))

    def _run_to_completion(self, commands: list[Command]) -> list[Event]:
        events = self.core.add(commands)
        while self.core.has_work or self._awaits_guides():
            if not self.core.has_work:
                self.core.wait_for_guides()
            events += self.core.step()
        return events

    def _awaits_guides(self) -> bool:
        return bool(getattr(self.core, "awaiting_guides", None))

    def _wake(self) -> None:
        """A guide finished compiling (called on a compiler worker): let the loop run a turn."""
        with self._thread.lock:
            if self._alive and self._thread.alive and self._thread.started:
                self._thread.inbox.put((self, _WAKE))

    def step_sync(self, commands: Iterable[Command] = ()) -> list[Event]:
        """Take commands and run a single step (on the engine's thread); returns that step's events."""
        if self._thread.started:
            raise RuntimeError("step_sync cannot run while the engine thread is started")
        return self._thread.worker.call(lambda: self._one_step(list(commands)))

    def _one_step(self, commands: list[Command]) -> list[Event]:
        events = self.core.add(commands)
        if self.core.has_work:
            events += self.core.step()
        return events


class _TorchThread:
    """One long-lived thread that runs the callables given to it, in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            job()

    def post(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the thread and return at once."""
        self._jobs.put(fn)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the thread and wait for its result (its exception is raised here)."""
        if threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        outcome: list[Any] = []

        def job() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                outcome.append((False, error))
            finally:
                done.set()

        self._jobs.put(job)
        done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def stop(self, timeout: float | None = 30.0) -> None:
        self._jobs.put(_STOP)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _fail(commands: Iterable[Command], status: int, message: str) -> list[Event]:
    return [Failed(c.request_id, status, message) for c in commands if isinstance(c, Generate | Encode)]


def _set_threads(config: EngineConfig) -> None:
    if config.num_threads == 0 or resolve_device(config.device).type != "cpu":
        return
    torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) - 1))


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", re.IGNORECASE)


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string like "1GiB", "512M", "2G", "1.5GB" (binary units throughout,
    as the CLI's human-readable sizes)."""
    if isinstance(value, int):
        return value
    match = _MEMORY.fullmatch(value)
    if match is None:
        raise ValueError(f"cannot read a memory size from {value!r}; write e.g. 1GiB or 512M")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _num_kv_blocks(config: EngineConfig, loaded: LoadedModel, max_model_len: int) -> int:
    """Blocks the KV cache gets: the override, else as many as the memory holds, capped by what
    `max_num_seqs` sequences of `max_model_len` tokens could ever use at once."""
    if config.num_kv_blocks is not None:
        if config.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")
        return config.num_kv_blocks
    memory = parse_memory(
        config.kv_cache_memory if config.kv_cache_memory is not None else DEFAULT_KV_CACHE_MEMORY
    )
    dtype = next(loaded.model.parameters()).dtype
    per_block = PagedKVCache.bytes_per_block(loaded.config, config.block_size, dtype)
    useful = config.max_num_seqs * -(-max_model_len // config.block_size)
    blocks = min(memory // per_block, useful)
    if blocks < 1:
        raise ValueError(f"kv_cache_memory={memory} bytes holds no block ({per_block} bytes each)")
    return blocks


def _fit_in_cache(max_model_len: int, capacity: int, config: EngineConfig) -> int:
    """A sequence must fit in the cache on its own, or it could never finish: an explicit
    max_model_len that does not fit is an error, the model's default is lowered to fit."""
    if max_model_len <= capacity:
        return max_model_len
    if config.max_model_len is not None:
        raise ValueError(
            f"max_model_len={max_model_len} is larger than the KV cache holds ({capacity} tokens); "
            "give it more memory (kv_cache_memory) or lower max_model_len"
        )
    logger.warning("max_model_len lowered to %d tokens: the KV cache holds no more", capacity)
    return capacity


def _max_model_len(requested: int | None, loaded: LoadedModel) -> int:
    """The context window: the model's own unless asked for less; capped by a sliding window on every
    layer (Mistral's), which the Llama model does not implement (attention beyond it would be wrong).
    Per-layer windows (`layer_types`: Gemma 3) are applied by the attention kernels."""
    limit = loaded.config.max_position_embeddings
    if loaded.config.sliding_window and not getattr(loaded.config, "layer_types", ()):
        limit = min(limit, loaded.config.sliding_window)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} tokens")
    return requested
