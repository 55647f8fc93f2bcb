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
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

import kernels
from engine.core import EngineCore
from engine.loader import LoadedModel, load_model, resolve_device
from engine.model_files import DEFAULT_MODEL, resolve_model
from engine.tokenizer import HFTokenizer
from protocol.engine_api import Command, Encode, Event, Failed, Generate

logger = logging.getLogger(__name__)

EventCallback = Callable[[list[Event]], None]
_STOP = object()


@dataclass(kw_only=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # a packaged model name, a .gguf file, or an HF folder
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # default: the model's context length
    seed: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    progress: bool = True  # show a loading progress bar on stderr
    # torch intra-op threads on CPU. None: all cores but one, which stays free for the event loop
    # (two threads contending for two cores make each small matmul wait ~15 ms at OpenMP barriers);
    # 0: leave torch's setting alone. The setting is process-wide.
    num_threads: int | None = None
    # kernels whose result for a row does not depend on the rest of the batch (process-wide, slower)
    batch_invariant: bool = False


class Engine:
    """Loads the model, then serves `Generate` / `Abort` commands on its own thread."""

    task: Literal["generate"] = "generate"

    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config = config or EngineConfig()
        _set_threads(config)
        if config.batch_invariant:
            kernels.set_batch_invariant(True)
        source = loaded.source if loaded else resolve_model(config.model)
        loaded = loaded or load_model(source, config.dtype, config.device, config.progress)
        self.loaded = loaded
        self.tokenizer: HFTokenizer = loaded.tokenizer
        self.model_name = config.served_model_name or source.name
        self.root = str(source.path)
        self.vocab_size = loaded.config.vocab_size
        self.generation_defaults: dict[str, Any] = dict(loaded.generation_defaults)
        self.max_model_len = _max_model_len(config.max_model_len, loaded)
        self.core = EngineCore(
            loaded.model,
            self.tokenizer.eos_token_ids,
            self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            seed=config.seed,
        )
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submits against the thread's death
        self._thread: threading.Thread | None = None
        self._on_events: EventCallback | None = None
        self._alive = True  # False once the loop has died or shut down
        self._refusal = (503, "the engine is shut down")  # how submits are failed once not alive

    # ---- the thread ----

    @property
    def healthy(self) -> bool:
        return self._alive

    def start(self, on_events: EventCallback) -> None:
        """Start the engine thread; `on_events` is called on it once per step with that step's events."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._on_events = on_events
        self._thread = threading.Thread(target=self._loop, name="sansllm-engine", daemon=True)
        self._thread.start()

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
        if was_alive:
            self._inbox.put(_STOP)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

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
        """Run commands to completion on the calling thread (offline use, benchmarks, tests).

        Not for use while the engine thread is running.
        """
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("generate_sync cannot run while the engine thread is started")
        events = self.core.add(commands)
        while self.core.has_work:
            events += self.core.step()
        return events

    def step_sync(self, commands: Iterable[Command] = ()) -> list[Event]:
        """Take commands and run a single step on the calling thread; returns that step's events."""
        events = self.core.add(commands)
        if self.core.has_work:
            events += self.core.step()
        return events


def _fail(commands: Iterable[Command], status: int, message: str) -> list[Event]:
    return [Failed(c.request_id, status, message) for c in commands if isinstance(c, Generate | Encode)]


def _set_threads(config: EngineConfig) -> None:
    if config.num_threads == 0 or resolve_device(config.device).type != "cpu":
        return
    torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) - 1))


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
