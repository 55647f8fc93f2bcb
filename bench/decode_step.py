"""Time (and optionally profile) steady-state decode steps of N sequences on the engine's own thread.

    python -m bench.decode_step --seqs 1,2,4,8,16,32 --prompt-len 128 [--dtype float32] [--profile]
        [--idle-model all-MiniLM-L6-v2 --idle-thread own|shared]

The per-step view behind bench/RESULTS.md's "where the time goes": it runs N greedy requests past
their prefill, then times `--steps` decode steps through `Engine.step_sync` and, with `--profile`,
prints torch.profiler's table for 10 more. No baseline here: the end-to-end ratios against HF come
from `bench.throughput`.

`--idle-model` loads a second model beside the measured one and runs one request through it before
timing, so its thread (its own, or the measured model's shared one) has done torch work: what a
server with several models costs the model that is busy.
"""

from __future__ import annotations

import argparse
import time

from engine import Engine, EngineConfig
from protocol.engine_api import Abort, Encode, Generate, PoolingParams, SamplingParams, Tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_step", description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="32", help="comma-separated sequence counts, each timed in turn")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--idle-model", help="a second model loaded beside, idle while timing")
    parser.add_argument("--idle-thread", choices=("own", "shared"), default="shared")
    parser.add_argument("--dequantize", action="store_true", help="GGUF weights dequantized at load")
    parser.add_argument(
        "--activations", choices=("float", "int8"), default="float", help="the quantized GEMV's activations"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's setting)")
    args = parser.parse_args(argv)

    options = {"model": args.model} if args.model else {}
    engine = Engine(
        EngineConfig(
            progress=False,
            dtype=args.dtype,
            keep_quantized=not args.dequantize,
            quantized_activations=args.activations,
            num_threads=args.threads,
            **options,
        )
    )
    if args.idle_model:
        thread = engine._thread if args.idle_thread == "shared" else None
        idle = Engine(EngineConfig(model=args.idle_model, progress=False), thread=thread)
        warm = Encode("warm", tuple(idle.tokenizer.encode("A sentence to warm the idle model up.")), PoolingParams())
        idle.generate_sync([warm])
        print(f"idle model beside: {args.idle_model} on the {args.idle_thread} thread")
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=args.steps + 200, ignore_eos=True, temperature=0.0)
    for seqs in [int(count) for count in args.seqs.split(",")]:
        # one engine for every count (a model load each would cost seconds); each count's requests are
        # aborted before the next count's start
        ids = [f"s{seqs}-r{i}" for i in range(seqs)]
        requests = [
            Generate(ids[i], tuple((i * 7 + j) % (vocab - 100) + 100 for j in range(args.prompt_len)), params)
            for i in range(seqs)
        ]
        started: set[str] = set()  # requests past their prefill (they have produced a token)
        events = engine.step_sync(requests)
        while True:
            started.update(event.request_id for event in events if isinstance(event, Tokens))
            if len(started) == seqs:
                break
            events = engine.step_sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step_sync()
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
        weights = "dequantized" if args.dequantize else f"GGUF blocks, {args.activations} GEMV"
        dtype = engine.loaded.model.model.norm.weight.dtype
        print(f"decode step, {seqs} sequences, {dtype}, {weights}: {step_ms:.1f} ms", flush=True)
        if args.profile:
            break
        engine.step_sync([Abort(request_id) for request_id in ids])
    if args.profile:
        from torch.profiler import profile

        def run():
            with profile() as prof:
                for _ in range(10):
                    engine.core.step()
            return prof

        print(engine._thread.worker.call(run).key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    engine.shutdown()


if __name__ == "__main__":
    main()
