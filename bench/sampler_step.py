"""Time the sampler alone for one step of N rows: plain sampling against penalties + top_p + logprobs.

    python -m bench.sampler_step [--rows 32] [--vocab 49152] [--steps 40] [--threads 1]

What `make bench-sampling` measures end to end, without the model: each variant admits N keyed
sequences (a prompt and an output history), then times `Sampler.__call__` plus the `accept` of its
tokens per step, on logits shaped like a language model's (a peaked distribution), and prints the
median step of each and their ratio, with the parts (processors, masks, logprobs) of the costly one.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

import kernels
from engine.allocator import keep_step_buffers
from engine.sampler import Sampler, SamplingRow, batched_token_logprobs, sampling_tensors
from protocol.engine_api import SamplingParams

PLAIN = SamplingParams(temperature=1.0, seed=0)
COSTLY = SamplingParams(
    temperature=1.0,
    seed=0,
    top_p=0.9,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    repetition_penalty=1.1,
    logprobs=5,
)


def _median_ms(fn: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def _admitted(params: SamplingParams, rows: int, vocab: int) -> tuple[Sampler, list[SamplingRow]]:
    sampler, rng = Sampler(torch.Generator().manual_seed(0)), random.Random(0)
    batch = []
    for i in range(rows):
        prompt = [rng.randrange(vocab) for _ in range(300)]
        sampler.admit(f"s{i}", params, prompt, {2})
        sampler.accept(f"s{i}", [rng.randrange(vocab) for _ in range(60)])
        batch.append(SamplingRow(params, prompt, [], {2}, torch.Generator().manual_seed(i), key=f"s{i}"))
    return sampler, batch


def step_ms(params: SamplingParams, rows: int, vocab: int, steps: int) -> float:
    sampler, batch = _admitted(params, rows, vocab)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)) * 6

    def step() -> None:
        result = sampler(logits.clone(), batch)
        for row, token in zip(batch, result.token_ids, strict=True):
            assert row.key is not None
            sampler.accept(row.key, [token])

    return _median_ms(step, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sampler_step", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_step_buffers()  # as the engine does: otherwise glibc's page faults are half of a step
    plain = step_ms(PLAIN, args.rows, args.vocab, args.steps)
    costly = step_ms(COSTLY, args.rows, args.vocab, args.steps)
    print(
        f"{args.rows} rows x {args.vocab} vocab, {args.threads} thread(s): plain {plain:.2f} ms/step, "
        f"penalties + top_p + logprobs=5 {costly:.2f} ms/step: x{costly / plain:.2f}"
    )
    sampler, batch = _admitted(COSTLY, args.rows, args.vocab)
    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(1)) * 6
    raw = torch.log_softmax(logits, dim=-1)
    tokens = raw.argmax(dim=-1)
    scratch = logits.clone()  # processed in place, again and again (the cost does not depend on the values)
    parts = {
        "raw log_softmax": lambda: torch.log_softmax(logits, dim=-1),
        "processors (all rows penalised)": lambda: sampler.process(scratch, batch),
        "masks (temperature, top_p)": lambda: kernels.apply_sampling_masks(
            logits, *sampling_tensors(batch, "cpu")
        ),
        "logprobs=5 (rank + top 5)": lambda: batched_token_logprobs(raw, tokens, [5] * args.rows),
    }
    for name, fn in parts.items():
        print(f"  {name}: {_median_ms(fn, args.steps):.2f} ms")


if __name__ == "__main__":
    main()
