"""Our engine driven through its Python API (`engine.engine.Engine`), timed like the HF baseline.

A closed loop keeps at most `concurrency` requests in flight: all at once when the prompt count
equals the concurrency, one at a time when it is 1. Every request is greedy with `ignore_eos` and a
fixed `max_tokens`, so it yields exactly the tokens the HF baseline yields, unless `sampling` asks
for more (a temperature and seed, penalties, logprobs).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import queue
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from bench.stats import RequestTiming
from protocol.engine_api import Event, Failed, Generate, SamplingParams, Tokens

# A request that makes no progress for this long means the engine is stuck: fail the benchmark
# instead of hanging it.
STALL_TIMEOUT_S = 600.0


class EngineFailure(RuntimeError):
    pass


def _config_fields(config_type: type) -> set[str] | None:
    """Field names a config class accepts (msgspec Struct, dataclass or plain __init__); None: unknown."""
    if isinstance(config_type, type) and issubclass(config_type, msgspec.Struct):
        return set(config_type.__struct_fields__)
    if dataclasses.is_dataclass(config_type):
        return {f.name for f in dataclasses.fields(config_type)}
    try:
        parameters = inspect.signature(config_type).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def build_engine_config(config_type: type, options: dict[str, Any]) -> Any:
    """`config_type(**options)`, leaving out (and naming on stderr) options this engine does not know.

    The engine's config is still growing; a benchmark that refuses to run because a tuning knob is
    missing helps nobody, but a dropped knob must not go unnoticed either.
    """
    known = _config_fields(config_type)
    kept = {k: v for k, v in options.items() if v is not None and (known is None or k in known)}
    dropped = sorted(k for k, v in options.items() if v is not None and k not in kept)
    if dropped:
        print(f"note: EngineConfig has no {', '.join(dropped)}; left out", file=sys.stderr)
    return config_type(**kept)


class EngineRunner:
    """Owns one started engine; `run` may be called repeatedly (warm-up, then each batch size)."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        sampling: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        from engine import Engine, EngineConfig  # deferred: importing it loads torch models code

        # Extra SamplingParams fields for every request (a `seed` is offset by the request's number,
        # so two runners give their i-th requests the same seed).
        self.sampling = dict(sampling or {})
        self.engine = Engine(
            build_engine_config(EngineConfig, {"model": model_path, "dtype": dtype, **options})
        )
        self._timings: dict[str, RequestTiming] = {}
        self._finished: queue.Queue[str | Failed] = queue.Queue()
        self._ids = itertools.count()
        self.engine.start(self._on_events)

    def _on_events(self, events: list[Event]) -> None:
        """Engine thread: one call per step. Stamp the step once, then only append and enqueue."""
        now = time.perf_counter()
        for event in events:
            if isinstance(event, Failed):
                self._finished.put(event)
                continue
            if not isinstance(event, Tokens) or event.request_id not in self._timings:
                continue
            timing = self._timings[event.request_id]
            if event.token_ids:
                timing.chunk_times.append(now)
                timing.output_tokens += len(event.token_ids)
            timing.prompt_tokens = event.num_prompt_tokens
            timing.cached_tokens = max(timing.cached_tokens, event.num_cached_tokens)
            if event.finish_reason is not None:
                self._finished.put(event.request_id)

    def _submit(self, prompt: Sequence[int], output_len: int) -> str:
        number = next(self._ids)
        request_id = f"bench-{number}"
        extra = dict(self.sampling)
        if "seed" in extra:
            extra["seed"] += number
        params = SamplingParams(
            **{"max_tokens": output_len, "temperature": 0.0, "ignore_eos": True, **extra}
        )
        self._timings[request_id] = RequestTiming(start=time.perf_counter())
        self.engine.submit([Generate(request_id=request_id, prompt_token_ids=tuple(prompt), params=params)])
        return request_id

    def _wait_one(self) -> str:
        try:
            done = self._finished.get(timeout=STALL_TIMEOUT_S)
        except queue.Empty:
            raise EngineFailure(f"no request finished within {STALL_TIMEOUT_S:.0f}s") from None
        if isinstance(done, Failed):
            raise EngineFailure(f"engine failed {done.request_id}: {done.status} {done.message}")
        return done

    def run(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int], concurrency: int
    ) -> list[RequestTiming]:
        """Serve every prompt with at most `concurrency` in flight; timings in prompt order."""
        order: list[str] = []
        pending = iter(zip(prompts, output_lens, strict=True))
        for prompt, n in itertools.islice(pending, concurrency):
            order.append(self._submit(prompt, n))
        for _ in range(len(prompts)):
            self._wait_one()
            following = next(pending, None)
            if following is not None:
                order.append(self._submit(*following))
        return [self._timings.pop(request_id) for request_id in order]

    def warmup(self, prompt: Sequence[int]) -> None:
        """Pay one-off costs (allocator, kernel selection) before anything is timed."""
        self.run([prompt], [4], 1)

    def close(self) -> None:
        """Stop the engine thread (what is still running is failed and ignored)."""
        self.engine.shutdown()
