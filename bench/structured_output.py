"""Structured output's costs in the engine: guide compile times, and what a slow compile does to others.

    .venv/bin/python -m bench.structured_output [--streams 16] [--rounds 3] [--record]

1. Compile times on the default model's tokenizer: the first guide (which also builds the
   vocabulary of token bytes), the same constraint again (a cache hit), and a second typical schema.
2. Inter-token latency of `--streams` greedy unconstrained streams, measured in alternating
   windows: "quiet" (nothing compiling) and "compiling" (a request whose schema takes outlines-core
   seconds to compile was just submitted), for both backends. Each round uses a schema never seen
   before, so each compiles from scratch. The engine thread never compiles, so no step waits for
   a compile; what remains is the CPU a compile takes from the decode threads.

The throughput cost at 32 streams is measured over HTTP by `make bench-structured` (bench.serving
with a JSON-schema variant).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from collections.abc import Sequence

from bench.report import RESULTS_PATH, append_section, command_line, fmt, markdown_table
from bench.stats import percentile
from protocol.engine_api import Abort, Event, Generate, SamplingParams, StructuredOutput, Tokens

TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
        },
    },
    "required": ["name", "age"],
}


def slow_schema(salt: str, fields: int = 20) -> dict:
    """Many bounded required strings: seconds to compile over a 49k-token vocabulary (3.5 s measured)."""
    names = [f"{salt}_field_{i}" for i in range(fields)]
    return {
        "type": "object",
        "properties": {name: {"type": "string", "maxLength": 30} for name in names},
        "required": names,
    }


def constraint(schema: dict, backend: str | None = None) -> StructuredOutput:
    return StructuredOutput(json=json.dumps(schema), backend=backend)


BACKENDS = {"default (llguidance)": None, "outlines-core": "outlines"}


class Timeline:
    """Token arrival times per request, fed by the engine thread's callback."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = {}
        self.first_token: dict[str, threading.Event] = {}
        self.failures: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def __call__(self, events: list[Event]) -> None:
        now = time.perf_counter()
        with self._lock:
            for event in events:
                if isinstance(event, Tokens):
                    if event.token_ids:
                        self.arrivals.setdefault(event.request_id, []).append(now)
                        if event.request_id in self.first_token:
                            self.first_token[event.request_id].set()
                else:
                    self.failures.put(event)

    def gaps(self, request_ids: Sequence[str], start: float, end: float) -> list[float]:
        with self._lock:
            gaps = []
            for request_id in request_ids:
                times = [t for t in self.arrivals.get(request_id, []) if start <= t <= end]
                gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
            return gaps


def compile_times(engine) -> list[list[str]]:
    """Per backend: first use (the first one also builds the vocabulary), cached, another schema,
    the slow schema, and json_object (any object)."""
    guides = engine.core.guides
    rows = []

    def timed(what: str, backend_name: str, output: StructuredOutput, digits: int = 1) -> None:
        started = time.perf_counter()
        guides.compile(output).result()
        rows.append([backend_name, what, fmt((time.perf_counter() - started) * 1000, digits)])

    for index, (name, backend) in enumerate(BACKENDS.items()):
        first = "typical schema, first use" + (" (builds the vocabulary)" if index == 0 else "")
        timed(first, name, constraint(TYPICAL_SCHEMA, backend))
        timed("typical schema, cached", name, constraint(TYPICAL_SCHEMA, backend), 3)
        other = json.loads(json.dumps(TYPICAL_SCHEMA).replace('"street"', '"road"'))
        timed("another typical schema", name, constraint(other, backend))
        timed("slow schema (20 bounded strings)", name, constraint(slow_schema("probe"), backend))
        timed("json_object (any object)", name, StructuredOutput(json_object=True, backend=backend))
    return rows


def itl_windows(engine, timeline: Timeline, streams: int, rounds: int, quiet_s: float) -> list[list[str]]:
    """Quiet windows against windows that start when a request with a never-seen slow schema
    arrives: with outlines-core the window lasts until the guide is compiled (its first token);
    with the default backend (compiled in milliseconds) it lasts `quiet_s`, the new request decoding."""
    prompt = tuple(engine.tokenizer.encode("Write a long story about a lighthouse keeper and the sea."))
    background = [f"bg-{i}" for i in range(streams)]
    params = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    engine.submit([Generate(request_id, prompt, params) for request_id in background])
    time.sleep(3.0)  # prefill and a settled decode batch before the first window
    rows = []
    totals = {name: ([], []) for name in BACKENDS}
    for round_index in range(rounds):
        for name, backend in BACKENDS.items():
            start = time.perf_counter()
            time.sleep(quiet_s)
            quiet = timeline.gaps(background, start, time.perf_counter())
            request_id = f"constrained-{round_index}-{backend}"
            timeline.first_token[request_id] = threading.Event()
            schema = constraint(slow_schema(f"r{round_index}{backend}"), backend)
            params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, structured=schema)
            start = time.perf_counter()
            engine.submit([Generate(request_id, prompt, params)])
            if not timeline.first_token[request_id].wait(120):
                raise SystemExit("the constrained request never started")
            waited = time.perf_counter() - start
            if backend is None:
                time.sleep(max(0.0, quiet_s - waited))
            busy = timeline.gaps(background, start, time.perf_counter())
            engine.submit([Abort(request_id)])
            totals[name][0].extend(quiet)
            totals[name][1].extend(busy)
            rows.append(_row(f"{name}, round {round_index + 1}", quiet, busy, waited))
    engine.submit([Abort(request_id) for request_id in background])
    rows += [_row(f"{name}, all rounds", quiet, busy, float("nan")) for name, (quiet, busy) in totals.items()]
    return rows


def _row(name: str, quiet: list[float], busy: list[float], compile_s: float) -> list[str]:
    q50, b50 = statistics.median(quiet), statistics.median(busy)
    q90, b90 = percentile(quiet, 90), percentile(busy, 90)
    return [
        name, fmt(compile_s, 2), fmt(q50 * 1000), fmt(b50 * 1000), fmt(b50 / q50, 3),
        fmt(q90 * 1000), fmt(b90 * 1000), fmt(b90 / q90, 3),
    ]  # fmt: skip


ITL_HEADERS = (
    "backend, window pair", "wait for guide s", "ITL p50 quiet ms", "ITL p50 compiling ms", "p50 ratio",
    "ITL p90 quiet ms", "ITL p90 compiling ms", "p90 ratio",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16, help="unconstrained streams decoding meanwhile")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-s", type=float, default=4.0, help="length of each quiet window")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    from engine import DEFAULT_MODEL, Engine, EngineConfig

    engine = Engine(EngineConfig(model=DEFAULT_MODEL, progress=False, max_model_len=4096))
    compile_rows = compile_times(engine)
    timeline = Timeline()
    engine.start(timeline)
    try:
        itl_rows = itl_windows(engine, timeline, args.streams, args.rounds, args.quiet_s)
    finally:
        engine.shutdown()
    body = (
        "Compile times (ms):\n\n"
        + markdown_table(("backend", "guide", "ms"), compile_rows)
        + f"\n\nInter-token latency of {args.streams} unconstrained greedy streams while a slow schema compiles:\n\n"
        + markdown_table(ITL_HEADERS, itl_rows)
    )
    print(body)
    if args.record:
        command = command_line("bench.structured_output", sys.argv[1:] if argv is None else list(argv))
        append_section("Structured output: compile times, and ITL while a guide compiles", command, args.note, body)
        print(f"recorded in {RESULTS_PATH}")


if __name__ == "__main__":
    main()
