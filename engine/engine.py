"""The engine thread: drains an inbox of commands, steps the model, hands each step's events to a callback.

The runtime bridges (asyncio, trio) give `start` a callback that wakes their loop; everything
crosses the thread boundary as the msgspec structs of `protocol.engine_api`. If the loop dies,
every pending request gets `Failed(..., 500, ...)`, `healthy` turns False, and later submits
fail at once.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

import kernels
from engine.attention import PagedKVCache
from engine.core import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineCore, EngineStats
from engine.loader import LoadedModel, load_model, resolve_device
from engine.model_files import DEFAULT_MODEL, resolve_model
from engine.tokenizer import HFTokenizer
from protocol.engine_api import Command, Encode, Event, Failed, Generate

logger = logging.getLogger(__name__)

EventCallback = Callable[[list[Event]], None]
_STOP = object()

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in float32


@dataclass(kw_only=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # a packaged model name, a .gguf file, or an HF folder
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # default: the model's context length
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # tokens per step (chunked prefill)
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


class Engine:
    """Loads the model, then serves `Generate` / `Abort` commands on its own thread."""

    tasks: frozenset[str] = frozenset({"generate"})

    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config = config or EngineConfig()
        # All torch work (loading, the KV cache, every step) runs on this one thread. Why: each
        # thread that runs torch ops on the CPU gets its own OpenMP team, and with two teams on a
        # small machine libgomp stops spinning between parallel regions; decode steps then took
        # ~45% longer (measured: 127 vs 87 ms for 32 sequences on 2 cores).
        self._worker = _TorchThread("sansllm-engine")
        try:
            self._worker.call(lambda: self._build(config, loaded))
        except BaseException:
            self._worker.stop()
            raise
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submits against the thread's death
        self._started = False
        self._on_events: EventCallback | None = None
        self._alive = True  # False once the loop has died or shut down
        self._refusal = (503, "the engine is shut down")  # how submits are failed once not alive

    def _build(self, config: EngineConfig, loaded: LoadedModel | None) -> None:
        _set_threads(config)
        if config.batch_invariant:
            kernels.set_batch_invariant(True)
        source = loaded.source if loaded else resolve_model(config.model)
        loaded = loaded or load_model(source, config.dtype, config.device, config.progress)
        if not config.batch_invariant:
            loaded.model.pack_weights()
        kernels.prepare(loaded.model.lm_head.weight.device)
        self.loaded = loaded
        self.tokenizer: HFTokenizer = loaded.tokenizer
        self.model_name = config.served_model_name or source.name
        self.root = str(source.path)
        self.vocab_size = loaded.config.vocab_size
        self.generation_defaults: dict[str, Any] = dict(loaded.generation_defaults)
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
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            seed=config.seed,
        )

    # ---- the thread ----

    @property
    def healthy(self) -> bool:
        return self._alive

    def stats(self) -> EngineStats:
        """Scheduler and KV cache numbers for metrics, as of the last step (any thread may call it)."""
        return self.core.stats()

    def start(self, on_events: EventCallback) -> None:
        """Start the engine thread; `on_events` is called on it once per step with that step's events."""
        if self._started:
            raise RuntimeError("engine already started")
        self._started = True
        self._on_events = on_events
        self._worker.post(self._loop)

    def submit(self, commands: Iterable[Command]) -> None:
        """Enqueue commands (thread-safe, returns at once). A dead engine fails them right away."""
        commands = list(commands)
        with self._lock:
            if self._alive:
                for command in commands:
                    self._inbox.put(command)
                return
        failures = _fail(commands, *self._refusal)
        if failures and self._on_events is not None:
            self._on_events(failures)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; requests still running get `Failed(503)`."""
        with self._lock:
            was_alive, self._alive = self._alive, False
        if was_alive and self._started:
            self._inbox.put(_STOP)
        self._worker.stop(timeout)

    def _loop(self) -> None:
        undelivered: list[Event] = []  # this step's events, until handed over
        try:
            while True:
                commands, stop = self._drain(block=not self.core.has_work)
                undelivered = self.core.add(commands)
                if stop:
                    undelivered += self.core.fail_all(503, "the engine is shutting down")
                    undelivered += _fail(self._leftovers(), 503, "the engine is shutting down")
                elif self.core.has_work:
                    undelivered += self.core.step()
                if undelivered:
                    events, undelivered = undelivered, []
                    self._on_events(events)
                if stop:
                    return
        except BaseException as error:  # noqa: BLE001 - any death must fail the pending requests
            logger.exception("engine thread died")
            self._die(f"engine error: {type(error).__name__}: {error}", undelivered)

    def _drain(self, block: bool) -> tuple[list[Command], bool]:
        commands: list[Command] = []
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if item is _STOP:
                    return commands, True
                commands.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return commands, False

    def _leftovers(self) -> list[Command]:
        items = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return [i for i in items if i is not _STOP]
            items.append(item)

    def _die(self, message: str, undelivered: list[Event]) -> None:
        """Fail everything still pending; events the dying step had already made go out first."""
        with self._lock:
            self._alive = False
            self._refusal = (500, message)
            pending = self._leftovers()
        events = undelivered + self.core.fail_all(500, message) + _fail(pending, 500, message)
        if events and self._on_events is not None:
            try:
                self._on_events(events)
            except Exception:  # noqa: BLE001 - nothing more we can do for them
                logger.exception("could not deliver the engine's failure events")

    # ---- offline use ----

    def generate_sync(self, commands: Iterable[Command]) -> list[Event]:
        """Run commands to completion (offline use, benchmarks, tests), on the engine's thread.

        Not for use while the engine thread is running.
        """
        if self._started:
            raise RuntimeError("generate_sync cannot run while the engine thread is started")
        return self._worker.call(lambda: self._run_to_completion(list(commands)))

    def _run_to_completion(self, commands: list[Command]) -> list[Event]:
        events = self.core.add(commands)
        while self.core.has_work:
            events += self.core.step()
        return events

    def step_sync(self, commands: Iterable[Command] = ()) -> list[Event]:
        """Take commands and run a single step (on the engine's thread); returns that step's events."""
        if self._started:
            raise RuntimeError("step_sync cannot run while the engine thread is started")
        return self._worker.call(lambda: self._one_step(list(commands)))

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
    """The context window: the model's own unless asked for less; capped by a sliding window,
    which this engine does not implement (attention beyond it would be wrong)."""
    limit = loaded.config.max_position_embeddings
    if loaded.config.sliding_window:
        limit = min(limit, loaded.config.sliding_window)
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} tokens")
    return requested
