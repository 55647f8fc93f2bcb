"""Offline throughput: our engine (Python API) against HF transformers, same model, dtype and prompts.

    .venv/bin/python -m bench.throughput [--batch 1,32] [--output-len 128] [--input-len 64,256] [--record]

For each batch size B: HF runs the prompts as static left-padded batches of B; our engine serves
them with at most B requests in flight (all submitted at once when there are B prompts, one at a
time when B is 1). Both decode greedily and exactly `--output-len` tokens per request. Prints
output tok/s, time per output token and the ratio ours/HF, and checks the acceptance targets:
batch 32 throughput >= 2x HF's, batch 1 time per output token <= 1.1x HF's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import msgspec
import torch

from bench.hf_baseline import HFBaseline, HFTokenizer
from bench.model_files import concrete_dtype, resolve_model
from bench.prompts import BenchPrompt, make_prompts, parse_range, warmup_prompt
from bench.report import (
    RESULTS_PATH,
    SUMMARY_HEADERS,
    append_section,
    command_line,
    fmt,
    markdown_table,
    summary_row,
)
from bench.stats import RequestTiming, Summary, ratio, summarize

HF = "hf-transformers"
OURS = "sansllm"
THROUGHPUT_TARGET = 2.0  # ours / HF aggregate output tok/s at batch 32
TPOT_TARGET = 1.1  # ours / HF time per output token at batch 1


class BatchResult(msgspec.Struct):
    batch: int
    summaries: dict[str, Summary]

    @property
    def throughput_ratio(self) -> float:
        if HF not in self.summaries or OURS not in self.summaries:
            return float("nan")
        return ratio(self.summaries[OURS].output_tok_s, self.summaries[HF].output_tok_s)

    @property
    def tpot_ratio(self) -> float:
        if HF not in self.summaries or OURS not in self.summaries:
            return float("nan")
        return ratio(self.summaries[OURS].tpot_mean, self.summaries[HF].tpot_mean)


def _int_list(value: str) -> list[int]:
    return [int(part) for part in value.split(",") if part]


def _engine_option(value: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as JSON when it parses (numbers, true/false), else as a string."""
    key, _, raw = value.partition("=")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (as the server), float32, bfloat16; both sides use it"
    )
    parser.add_argument("--batch", type=_int_list, default=[1, 32], help="comma-separated batch sizes")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts per batch size (default: B)")
    parser.add_argument(
        "--input-len", type=parse_range, default=(64, 256), help="prompt tokens, N or LOW,HIGH"
    )
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default=f"{HF},{OURS}", help=f"comma-separated subset of {HF},{OURS}")
    parser.add_argument(
        "--max-num-seqs", type=int, default=None, help="engine limit (default: largest batch)"
    )
    parser.add_argument("--engine-option", type=_engine_option, action="append", default=[],
                        metavar="KEY=VALUE", help="extra EngineConfig field (repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="file --record appends to")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. 'machine busy')")
    args = parser.parse_args(argv)
    args.dtype = concrete_dtype(args.dtype)
    args.backends = [name for name in args.backends.split(",") if name]
    unknown = set(args.backends) - {HF, OURS}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    return args


def _prompt_sets(args: argparse.Namespace, tokenizer: HFTokenizer) -> dict[int, list[BenchPrompt]]:
    """One prompt set per batch size, seeded by it, so no run reuses another's prefixes from a cache."""
    return {
        batch: make_prompts(
            tokenizer.encode,
            args.num_prompts or batch,
            input_len=args.input_len,
            output_len=(args.output_len, args.output_len),
            seed=args.seed * 1000 + batch,
        )
        for batch in args.batch
    }


class Backend(Protocol):
    """What both sides offer: HF's static batches of B, or our engine with at most B in flight."""

    def close(self) -> None: ...

    def warmup(self, prompt: Sequence[int]) -> None: ...

    def run(
        self, prompts: Sequence[Sequence[int]], output_lens: Sequence[int], batch: int
    ) -> list[RequestTiming]: ...


def _load_backend(name: str, args: argparse.Namespace, model: str, tokenizer: HFTokenizer) -> Backend:
    if name == HF:
        return HFBaseline(model, tokenizer, args.dtype)
    from bench.engine_runner import EngineRunner  # deferred: the HF-only mode must not need the engine

    options = dict(args.engine_option)
    options.setdefault("max_num_seqs", args.max_num_seqs or max(args.batch))
    options.setdefault("progress", False)
    # The thread count is process-wide: pin the engine to the one HF runs with, so it cannot
    # change the baseline's setting (or its own) behind the comparison's back.
    options.setdefault("num_threads", torch.get_num_threads())
    return EngineRunner(model, args.dtype, **options)


def _run_backend(
    name: str, args: argparse.Namespace, model: str, prompt_sets: dict[int, list[BenchPrompt]]
) -> dict[int, Summary]:
    """One backend's whole phase (load, warm up, every batch size), in a process of its own.

    Why a process: each thread that runs torch on the CPU keeps its own OpenMP team, and an idle
    team left by the other backend makes libgomp stop spinning for the active one; on 2 cores that
    slowed our batch-1 decode from 35 to 47 ms per token."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = HFTokenizer(model)
    backend = _load_backend(name, args, model, tokenizer)
    try:
        backend.warmup(warmup_prompt(tokenizer.encode, args.input_len[1]).token_ids)
        summaries = {}
        for batch, prompts in prompt_sets.items():
            ids, lens = [p.token_ids for p in prompts], [p.output_len for p in prompts]
            print(f"[{name}] batch {batch}: {len(prompts)} prompts", file=sys.stderr, flush=True)
            summaries[batch] = summarize(name, backend.run(ids, lens, batch))
        return summaries
    finally:
        backend.close()


def run(args: argparse.Namespace) -> list[BatchResult]:
    """HF's phase, then ours, each in a fresh process, on the same prompts.

    On a busy machine the two phases see different loads: compare only runs made on a quiet one."""
    model = resolve_model(args.model)
    prompt_sets = _prompt_sets(args, HFTokenizer(model))
    by_backend = {}
    for name in (HF, OURS):
        if name in args.backends:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                by_backend[name] = pool.submit(_run_backend, name, args, model, prompt_sets).result()
    return [
        BatchResult(batch, {name: summaries[batch] for name, summaries in by_backend.items()})
        for batch in prompt_sets
    ]


def render(args: argparse.Namespace, results: list[BatchResult]) -> str:
    """Tables per batch size, the ratios, and the acceptance checks that apply to this run."""
    lo, hi = args.input_len
    blocks = [
        f"Model `{resolve_model(args.model)}` ({args.dtype}), greedy, ignore_eos, {args.output_len} output "
        f"tokens per request, prompts of {lo}-{hi} tokens."
    ]
    checks = []
    for result in results:
        rows = [summary_row(s) for s in result.summaries.values()]
        blocks.append(f"### batch {result.batch}\n\n" + markdown_table(SUMMARY_HEADERS, rows))
        if len(result.summaries) == 2:
            blocks.append(
                f"ratio {OURS}/{HF} at batch {result.batch}: output tok/s x{fmt(result.throughput_ratio, 2)} "
                f"(higher is better), time per output token x{fmt(result.tpot_ratio, 2)} (lower is better)"
            )
            if result.batch == 32:
                ok = result.throughput_ratio >= THROUGHPUT_TARGET
                checks.append(
                    f"- batch 32 output tok/s >= {THROUGHPUT_TARGET}x HF: {'PASS' if ok else 'FAIL'}"
                )
            if result.batch == 1:
                ok = result.tpot_ratio <= TPOT_TARGET
                checks.append(
                    f"- batch 1 time per output token <= {TPOT_TARGET}x HF: {'PASS' if ok else 'FAIL'}"
                )
    if checks:
        blocks.append("Acceptance:\n\n" + "\n".join(checks))
    return "\n\n".join(blocks)


def run_and_report(argv: Sequence[str]) -> tuple[list[BatchResult], str]:
    """Parse, run, print the tables and (with --record) append them to the results file."""
    args = parse_args(argv)
    results = run(args)
    text = render(args, results)
    print(text)
    if args.record:
        command = command_line("bench.throughput", argv)
        append_section("Offline throughput", command, args.note, text, Path(args.results))
    return results, text


def main(argv: Sequence[str] | None = None) -> int:
    run_and_report(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
