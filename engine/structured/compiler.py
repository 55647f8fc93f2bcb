"""Compiling constraints off the engine thread, once per (constraint, tokenizer).

A JSON schema over a 150k-token vocabulary can take seconds to compile with outlines-core; vLLM
once stalled every running request while one compiled. Here the engine thread never compiles: it
asks for a guide, gets a future, and keeps stepping the other requests; the request waits (not
scheduled) until its future is done. Both libraries release the GIL while compiling.

The workers run at normal priority. At nice 10 or 19 a compile made no progress at all while the
decode threads kept both cores of a 2-core machine busy (a constrained request waited > 120 s);
the price of normal priority is that a seconds-long compile slows the decode steps it shares the
cores with (bench.structured_output measures it), which is why JSON schemas compile with
llguidance (milliseconds) unless the request asks for outlines.

One compiler serves one tokenizer, so its cache is keyed by the constraint alone; failures are
cached too (a bad schema sent again is answered at once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.structured.guides import CompiledGuide, ConstraintError, compile_constraint
from engine.structured.vocabulary import ConstraintVocabulary, constraint_vocabulary
from protocol.engine_api import StructuredOutput

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256


@dataclass(frozen=True)
class CompileTiming:
    """How long one compile took (seconds) and what it compiled (for logs and benchmarks)."""

    kind: str
    seconds: float
    ok: bool


def _kind(constraint: StructuredOutput) -> str:
    for kind in ("json", "regex", "choice", "grammar"):
        if getattr(constraint, kind) is not None:
            return kind
    return "json_object"


class GuideCompiler:
    """Futures of compiled guides for one tokenizer; `on_ready` is called (on a worker) when one is done."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        workers: int = 1,
        cache_size: int = DEFAULT_CACHE_SIZE,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(workers, "sansllm-guides")
        self._cache: OrderedDict[StructuredOutput, Future[CompiledGuide]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._vocabulary: ConstraintVocabulary | None = None
        self.on_ready = on_ready
        self.timings: list[CompileTiming] = []

    def compile(self, constraint: StructuredOutput) -> Future[CompiledGuide]:
        """The guide's future: done at once when cached, else compiled on a worker."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if self.on_ready is not None:
            on_ready = self.on_ready
            future.add_done_callback(lambda _: on_ready())
        return future

    def ready(self, constraint: StructuredOutput) -> CompiledGuide:
        """A guide whose future is done (raises its `ConstraintError` if it failed)."""
        future = self.compile(constraint)
        return future.result(timeout=0) if future.done() else future.result()

    @property
    def vocabulary(self) -> ConstraintVocabulary:
        if self._vocabulary is None:  # only workers build it (the first compile pays ~0.5 s)
            started = time.perf_counter()
            self._vocabulary = constraint_vocabulary(self._tokenizer)
            logger.info(
                "structured output: vocabulary of %d tokens ready in %.2f s",
                len(self._vocabulary.tokens),
                time.perf_counter() - started,
            )
        return self._vocabulary

    def _compile(self, constraint: StructuredOutput) -> CompiledGuide:
        kind = _kind(constraint)
        started = time.perf_counter()
        vocabulary = self.vocabulary
        try:
            guide = compile_constraint(constraint, vocabulary, self._tokenizer)
        except ConstraintError:
            self.timings.append(CompileTiming(kind, time.perf_counter() - started, False))
            raise
        except Exception as error:  # noqa: BLE001 - a library bug must not kill the request silently
            logger.exception("compiling a %s constraint failed", kind)
            self.timings.append(CompileTiming(kind, time.perf_counter() - started, False))
            raise ConstraintError(f"The {kind} constraint cannot be compiled: {error}") from None
        seconds = time.perf_counter() - started
        self.timings.append(CompileTiming(kind, seconds, True))
        logger.info("structured output: compiled a %s guide in %.3f s", kind, seconds)
        return guide

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
