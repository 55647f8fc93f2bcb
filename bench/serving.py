"""Serving benchmark: concurrent streaming clients against `sansllm serve`, with HF transformers alongside.

    .venv/bin/python -m bench.serving [--concurrency 32] [--input-len 32,512] [--output-len 16,256]
                                      [--shared-prefix] [--record]

Starts our server in a subprocess (or uses `--base-url`), sends every prompt as a streamed
/v1/completions request with at most C in flight, and reports output tok/s, TTFT and
inter-token latency p50/p99. In the same run, before the server starts (so the two never compete
for the CPU), HF transformers generates the same prompts as static batches of C (throughput) and
times single-sequence TTFT on a few of them.

`--shared-prefix` puts a ~500-token system prompt in front of every prompt and runs twice: first
with a unique salt in front of each copy (nothing cacheable: the "not cached" TTFT), then, after
one request has warmed the cache, with the shared prompt as is. The second run's requests report
`usage.prompt_tokens_details.cached_tokens`, and the table gives the TTFT ratio between the runs.

`--request-args JSON` merges sampling fields into every request body (e.g. `{"temperature": 1.0}`
for plain sampling), and each `--variant-request-args JSON` runs the same prompts again against the
same server with those fields merged too: the cost of penalties, top_p or logprobs as a ratio. So
that no run finds the one before it in the prefix cache, each then sends its own copy of the
prompts behind a short salt ("Run 2 (session)."), and an untimed rehearsal of the baseline goes
first (the first run after start-up otherwise pays for new prefill shapes: 1.5x slower measured).
`--rounds N` runs the baseline and the variants N times each in alternating order and reports each
round's ratio and their median: on a shared 2-core machine one pair's ratio moved by +-8%.

`--llama-server native` (or `avx2`, or `native,avx2`) adds llama.cpp's `llama-server` as a peer,
after our server (one process at a time): the same GGUF, prompts, client and request bodies
(greedy, ignore_eos, max_tokens), C slots; its rows get the same metrics and ratios against ours.
It is built from source on first use (`bench/llama_server.py`, cached).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import msgspec
import torch

from bench import llama_server
from bench.hf_baseline import HFBaseline, HFTokenizer
from bench.model_files import DEFAULT_MODEL_NAME, concrete_dtype, resolve_model
from bench.prompts import (
    BenchPrompt,
    Encode,
    make_prompts,
    parse_range,
    shared_system_prompt,
    warmup_prompt,
    with_prefix,
)
from bench.report import (
    RESULTS_PATH,
    SUMMARY_HEADERS,
    append_section,
    command_line,
    fmt,
    markdown_table,
    ms,
    summary_row,
)
from bench.server_process import ServerProcess
from bench.sse_client import run_clients, served_model_name
from bench.stats import RequestTiming, Summary, ratio, summarize

HF = "hf-transformers static batch"
OURS = "sansllm"
OURS_COLD = "sansllm, prefix not cached"
OURS_WARM = "sansllm, prefix cached"


class ServingResult(msgspec.Struct, kw_only=True):
    concurrency: int
    summaries: list[Summary]
    hf_single_ttft: float | None = None  # median over the sampled prompts
    warm_cached_tokens: list[int] | None = None  # per request of the cached run (shared-prefix mode)
    prefix_tokens: int | None = None
    requested_tokens: int | None = None  # output tokens the prompts ask for, per run
    llama_commands: list[str] = msgspec.field(default_factory=list)  # how each llama-server ran

    def get(self, name: str) -> Summary | None:
        return next((s for s in self.summaries if s.name == name), None)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help=f"name, GGUF file or HF folder (default {DEFAULT_MODEL_NAME})"
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (as the server), float32, bfloat16; both sides use it"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (C)")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per run (default: C)")
    parser.add_argument(
        "--input-len", type=parse_range, default=(32, 512), help="prompt tokens, N or LOW,HIGH"
    )
    parser.add_argument(
        "--output-len", type=parse_range, default=(16, 256), help="output tokens, N or LOW,HIGH"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared-prefix", action="store_true", help="a shared system prompt in front of all")
    parser.add_argument("--prefix-len", type=int, default=500, help="shared system prompt tokens")
    parser.add_argument(
        "--hf-ttft-samples", type=int, default=4, help="prompts HF times single-sequence TTFT on"
    )
    parser.add_argument(
        "--no-hf", action="store_true", help="skip the HF baseline (development only: no ratios)"
    )
    parser.add_argument("--base-url", default=None, help="use a running server instead of starting one")
    parser.add_argument("--runtime", choices=["asyncio", "trio"], default=None, help="server runtime")
    parser.add_argument(
        "--server-args", default="", help="extra `sansllm serve` flags, one shell-quoted string"
    )
    parser.add_argument(
        "--variant-server-args",
        action="append",
        default=[],
        metavar="ARGS",
        help="after the main server, run the same prompts against a server started with these extra "
        "flags too (repeatable; e.g. '--model all-MiniLM-L6-v2': an idle model beside); each gets its "
        "own rows and its ratio to the main server",
    )
    parser.add_argument(
        "--request-args",
        type=json_object,
        default={},
        metavar="JSON",
        help='fields merged into every request body, e.g. \'{"temperature": 1.0}\' (default: greedy)',
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --variant-request-args: run the baseline and the variants this many times each, "
        "alternating their order, and report every round's ratio and the median",
    )
    parser.add_argument(
        "--variant-request-args",
        type=json_object,
        action="append",
        default=[],
        metavar="JSON",
        help="after the main run, the same prompts against the same server with these fields merged "
        "too (repeatable); each gets its own row and its ratio to the main run",
    )
    parser.add_argument(
        "--llama-server",
        type=llama_server.parse_variants,
        default=(),
        metavar="none|native|avx2|native,avx2",
        help="also run llama.cpp's llama-server on the same GGUF and prompts, built (cached) with these "
        "variants: native = -march=native, avx2 = AVX2 path, no AVX-512 (default none)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the HF baseline")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="file --record appends to")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. 'machine busy')")
    args = parser.parse_args(argv)
    args.dtype = concrete_dtype(args.dtype)
    return args


def json_object(text: str) -> dict:
    """A JSON object from the command line (argparse type)."""
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def round_name(name: str, number: int) -> str:
    """A row's name in round `number` (0-based) of a `--rounds` run: the first round keeps the name."""
    return name if number == 0 else f"{name} (round {number + 1})"


def request_variant_name(name: str, fields: dict) -> str:
    """The row name of a run whose requests carry the extra `fields`."""
    return f"{name}, with {msgspec.json.encode(fields).decode()}"


class PromptPlan(msgspec.Struct):
    """What each run sends: `main` always; `cold` (salted prefixes) only in shared-prefix mode."""

    main: list[BenchPrompt]
    warmup: BenchPrompt
    cold: list[BenchPrompt] | None = None
    warmer: BenchPrompt | None = None  # warms the shared prefix before the cached run
    prefix_tokens: int | None = None
    # with request variants: each run's salted copy of `main` (rehearsal, baseline, variants...)
    salted_runs: list[list[BenchPrompt]] | None = None


def plan_prompts(args: argparse.Namespace, encode: Encode) -> PromptPlan:
    bodies = make_prompts(
        encode, args.num_prompts or args.concurrency, args.input_len, args.output_len, seed=args.seed
    )
    # A fresh salt per process: against a long-running server (--base-url), an earlier run's
    # salted prefixes must not be cached either.
    session = uuid.uuid4().hex[:8]
    if not args.shared_prefix:
        salted = None
        if getattr(args, "variant_request_args", None):
            runs = 1 + getattr(args, "rounds", 1) * (1 + len(args.variant_request_args))
            salted = [[with_prefix(encode, b, f"Run {i} ({session}). ") for b in bodies] for i in range(runs)]
        return PromptPlan(
            main=bodies,
            warmup=warmup_prompt(encode, max(len(p.token_ids) for p in bodies)),
            salted_runs=salted,
        )
    prefix = shared_system_prompt(encode, args.prefix_len)
    main = [with_prefix(encode, body, prefix) for body in bodies]
    cold = [
        with_prefix(
            encode, body, shared_system_prompt(encode, args.prefix_len, salt=f"Visitor {i}, {session}.")
        )
        for i, body in enumerate(bodies)
    ]
    warmer = with_prefix(encode, BenchPrompt(text=f"Hello ({session}).", token_ids=(), output_len=4), prefix)
    return PromptPlan(
        main=main,
        warmup=warmup_prompt(encode, max(len(p.token_ids) for p in main)),
        cold=cold,
        warmer=warmer,
        prefix_tokens=len(encode(prefix)),
    )


def run_hf(args: argparse.Namespace, model: str, tokenizer: HFTokenizer, plan: PromptPlan):
    """HF static batches of C over the main prompts, and single-sequence TTFT on a few of them."""
    baseline = HFBaseline(model, tokenizer, args.dtype)
    baseline.warmup(plan.warmup.token_ids)
    print(
        f"[hf] static batches of {args.concurrency} over {len(plan.main)} prompts",
        file=sys.stderr,
        flush=True,
    )
    ids, lens = [p.token_ids for p in plan.main], [p.output_len for p in plan.main]
    batch = summarize(HF, baseline.run(ids, lens, args.concurrency), useful_tokens=sum(lens))
    samples = plan.main[: max(1, args.hf_ttft_samples)]
    print(f"[hf] single-sequence TTFT on {len(samples)} prompts", file=sys.stderr, flush=True)
    single_ttft = statistics.median(baseline.ttft(p.token_ids) for p in samples)
    baseline.close()
    return batch, single_ttft


async def run_ours(
    base_url: str, args: argparse.Namespace, plan: PromptPlan, label: str = "ours"
) -> tuple[list[Summary], list[int]]:
    """The plan's runs against an OpenAI-compatible server (ours or a peer), rows named as ours."""
    model = await served_model_name(base_url, prefer=args.model or DEFAULT_MODEL_NAME)
    extra = getattr(args, "request_args", None) or {}
    await run_clients(base_url, model, [plan.warmup], 1, extra)
    if plan.cold is None:
        print(
            f"[{label}] {len(plan.main)} requests, concurrency {args.concurrency}",
            file=sys.stderr,
            flush=True,
        )
        variants = getattr(args, "variant_request_args", ()) if label == "ours" else ()
        if not (variants and plan.salted_runs):
            return [summarize(OURS, await run_clients(base_url, model, plan.main, args.concurrency, extra))], []
        runs = iter(plan.salted_runs)
        print(f"[{label}] rehearsal (untimed)", file=sys.stderr, flush=True)
        await run_clients(base_url, model, next(runs), args.concurrency, extra)
        rows = []
        for number in range(getattr(args, "rounds", 1)):
            # alternate which goes first, so a machine that drifts favours none of them
            order = [{}, *variants] if number % 2 == 0 else [*variants, {}]
            for fields in order:
                name = request_variant_name(OURS, fields) if fields else OURS
                print(f"[{label}] round {number + 1}: {name}", file=sys.stderr, flush=True)
                timings = await run_clients(base_url, model, next(runs), args.concurrency, {**extra, **fields})
                rows.append(summarize(round_name(name, number), timings))
        return rows, []
    print(f"[{label}] shared prefix, not cached (salted copies)", file=sys.stderr, flush=True)
    cold = await run_clients(base_url, model, plan.cold, args.concurrency)
    assert plan.warmer is not None
    await run_clients(base_url, model, [plan.warmer], 1)
    print(f"[{label}] shared prefix, cached", file=sys.stderr, flush=True)
    warm: list[RequestTiming] = await run_clients(base_url, model, plan.main, args.concurrency)
    return [summarize(OURS_COLD, cold), summarize(OURS_WARM, warm)], [t.cached_tokens for t in warm]


def llama_name(name: str, variant: str) -> str:
    """The row name of a llama-server run: ours with the backend swapped ("llama-server native, prefix cached")."""
    return f"llama-server {variant}" + name.removeprefix(OURS)


def longest_prompt(plan: PromptPlan) -> int:
    prompts = [*plan.main, *(plan.cold or ()), plan.warmup, *([plan.warmer] if plan.warmer else [])]
    return max(len(p.token_ids) for p in prompts)


def run_llama(
    args: argparse.Namespace, binaries: dict[str, Path], model_path: str, plan: PromptPlan
) -> tuple[list[Summary], list[str]]:
    """The plan against llama-server, once per built variant, with C slots sized for the longest request."""
    if Path(model_path).suffix != ".gguf":
        raise SystemExit(f"--llama-server needs a GGUF model; {model_path} is not one")
    per_slot = llama_server.context_per_slot(longest_prompt(plan), max(p.output_len for p in plan.main))
    summaries: list[Summary] = []
    commands: list[str] = []
    for variant, binary in binaries.items():
        server = llama_server.LlamaServer.for_model(
            binary, model_path, args.concurrency, per_slot, alias=args.model or DEFAULT_MODEL_NAME
        )
        commands.append(f"{variant}: `{shlex.join(server.command)}`")
        with server:
            rows, _ = asyncio.run(run_ours(server.base_url, args, plan, label=f"llama-server {variant}"))
        summaries += [msgspec.structs.replace(s, name=llama_name(s.name, variant)) for s in rows]
    return summaries, commands


def run(args: argparse.Namespace) -> ServingResult:
    if args.threads:
        torch.set_num_threads(args.threads)
    # built (or found cached) first: a build failure must not come after minutes of measuring
    binaries = {variant: llama_server.build(variant) for variant in args.llama_server}
    served = args.model or DEFAULT_MODEL_NAME
    model_path = resolve_model(args.model)
    tokenizer = HFTokenizer(model_path)
    plan = plan_prompts(args, tokenizer.encode)
    summaries: list[Summary] = []
    hf_single_ttft = None
    if not args.no_hf:
        hf_batch, hf_single_ttft = run_hf(args, model_path, tokenizer, plan)
        summaries.append(hf_batch)
    if args.base_url:
        ours, cached = asyncio.run(run_ours(args.base_url, args, plan))
    else:
        server_args = [
            "--dtype",
            args.dtype,
            "--enable-prompt-tokens-details",
            *shlex.split(args.server_args),
        ]
        if args.runtime:
            server_args += ["--runtime", args.runtime]
        with ServerProcess(served, server_args) as server:
            ours, cached = asyncio.run(run_ours(server.base_url, args, plan))
        for variant in args.variant_server_args:
            print(f"[ours] again, with server flags {variant}", file=sys.stderr, flush=True)
            with ServerProcess(served, [*server_args, *shlex.split(variant)]) as server:
                extra, _ = asyncio.run(run_ours(server.base_url, args, plan))
            ours += [msgspec.structs.replace(s, name=variant_name(s.name, variant)) for s in extra]
    summaries.extend(ours)
    llama_commands: list[str] = []
    if binaries:
        peers, llama_commands = run_llama(args, binaries, model_path, plan)
        summaries.extend(peers)
    return ServingResult(
        concurrency=args.concurrency,
        summaries=summaries,
        hf_single_ttft=hf_single_ttft,
        warm_cached_tokens=cached or None,
        prefix_tokens=plan.prefix_tokens,
        requested_tokens=sum(p.output_len for p in plan.main),
        llama_commands=llama_commands,
    )


def variant_name(name: str, variant: str) -> str:
    """The row name of a run against a server started with the extra flags `variant`."""
    return f"{name}, with {variant}"


def render(args: argparse.Namespace, result: ServingResult) -> str:
    lo_in, hi_in = args.input_len
    lo_out, hi_out = args.output_len
    blocks = [
        f"Model `{args.model or DEFAULT_MODEL_NAME}` ({args.dtype}), /v1/completions streamed, "
        + (f"with {msgspec.json.encode(args.request_args).decode()}" if getattr(args, "request_args", None) else "greedy")
        + f", ignore_eos; {result.summaries[-1].requests} requests per run, "
        f"concurrency {result.concurrency}, prompts of {lo_in}-{hi_in} tokens"
        + (f" behind a shared {result.prefix_tokens}-token system prompt" if result.prefix_tokens else "")
        + f", {lo_out}-{hi_out} output tokens each. HF output tok/s counts only the requested tokens "
        "(a static batch decodes every row to the longest request).",
        markdown_table(SUMMARY_HEADERS, [summary_row(s) for s in result.summaries]),
    ]
    hf = result.get(HF)
    ours = result.get(OURS) or result.get(OURS_WARM)
    lines = []
    if hf and ours:
        lines.append(
            f"- output tok/s, {ours.name} / HF static batch of {result.concurrency}: "
            f"x{fmt(ratio(ours.output_tok_s, hf.output_tok_s), 2)} (higher is better)"
        )
    if ours and result.hf_single_ttft is not None:
        lines.append(
            f"- TTFT p50 {ours.name} at concurrency {result.concurrency} ({ms(ours.ttft_p50)} ms) / HF single "
            f"sequence ({ms(result.hf_single_ttft)} ms): x{fmt(ratio(ours.ttft_p50, result.hf_single_ttft), 2)} (lower is better)"
        )
    cold, warm = result.get(OURS_COLD), result.get(OURS_WARM)
    if cold and warm:
        lines.append(
            f"- TTFT p50 prefix cached / not cached: {ms(warm.ttft_p50)} / {ms(cold.ttft_p50)} ms = "
            f"x{fmt(ratio(warm.ttft_p50, cold.ttft_p50), 2)} (lower is better)"
        )
        cached = result.warm_cached_tokens or [0]
        lines.append(
            f"- cached prompt tokens per request in the cached run: min {min(cached)}, "
            f"max {max(cached)} (shared prefix: {result.prefix_tokens} tokens)"
        )
    pairs = [(OURS, variant_name(OURS, v)) for v in getattr(args, "variant_server_args", ())]
    pairs += [(OURS, request_variant_name(OURS, f)) for f in getattr(args, "variant_request_args", ())]
    pairs += [
        (plain, variant_name(plain, v))
        for v in getattr(args, "variant_server_args", ())
        for plain in (OURS_COLD, OURS_WARM)
    ]
    for base, other in ((result.get(a), result.get(b)) for a, b in pairs):
        if base and other:
            lines.append(
                f"- output tok/s, {other.name} / {base.name}: {fmt(other.output_tok_s)} / "
                f"{fmt(base.output_tok_s)} = x{fmt(ratio(other.output_tok_s, base.output_tok_s), 3)}; "
                f"TPOT {ms(other.tpot_mean)} / {ms(base.tpot_mean)} ms; "
                f"TTFT p50 {ms(other.ttft_p50)} / {ms(base.ttft_p50)} ms"
            )
    rounds = getattr(args, "rounds", 1)
    for fields in getattr(args, "variant_request_args", ()) if rounds > 1 else ():
        other = request_variant_name(OURS, fields)
        per_round = [
            ratio(result.get(round_name(other, r)).output_tok_s, result.get(round_name(OURS, r)).output_tok_s)
            for r in range(rounds)
            if result.get(round_name(other, r)) and result.get(round_name(OURS, r))
        ]
        if per_round:
            lines.append(
                f"- output tok/s, {other} / {OURS}, per round (alternating order): "
                + ", ".join(f"x{fmt(v, 3)}" for v in per_round)
                + f"; median x{fmt(statistics.median(per_round), 3)}"
            )
    lines += llama_lines(args, result)
    if lines:
        blocks.append("Ratios:\n\n" + "\n".join(lines))
    if result.llama_commands:
        blocks.append(
            "llama-server (llama.cpp from llama-cpp-python "
            f"{llama_server.LLAMA_CPP_PYTHON_VERSION}, computing on the GGUF's quantized blocks), as started:"
            "\n\n" + "\n".join(f"- {command}" for command in result.llama_commands)
        )
    return "\n\n".join(blocks)


def llama_lines(args: argparse.Namespace, result: ServingResult) -> list[str]:
    """Ours against each llama-server variant: throughput, TTFT and ITL ratios; a warning on unequal outputs."""
    lines = []
    for variant in getattr(args, "llama_server", ()):
        for plain in (OURS, OURS_COLD, OURS_WARM):
            ours, peer = result.get(plain), result.get(llama_name(plain, variant))
            if not (ours and peer):
                continue
            lines.append(
                f"- {ours.name} / {peer.name}: output tok/s {fmt(ours.output_tok_s)} / {fmt(peer.output_tok_s)} = "
                f"x{fmt(ratio(ours.output_tok_s, peer.output_tok_s), 2)} (higher is better); "
                f"TTFT p50 x{fmt(ratio(ours.ttft_p50, peer.ttft_p50), 2)}, "
                f"ITL p50 x{fmt(ratio(ours.itl_p50, peer.itl_p50), 2)}, "
                f"ITL p99 x{fmt(ratio(ours.itl_p99, peer.itl_p99), 2)} (lower is better)"
            )
            if result.requested_tokens is not None and peer.output_tokens != result.requested_tokens:
                lines.append(
                    f"- WARNING: {peer.name} returned {peer.output_tokens} output tokens, "
                    f"{result.requested_tokens} were asked for: its tok/s is not like for like"
                )
    return lines


def run_and_report(argv: Sequence[str]) -> tuple[ServingResult, str]:
    """Parse, run, print the table and (with --record) append it to the results file."""
    args = parse_args(argv)
    result = run(args)
    text = render(args, result)
    print(text)
    if args.record:
        title = "Serving, shared prefix" if args.shared_prefix else "Serving"
        append_section(title, command_line("bench.serving", argv), args.note, text, Path(args.results))
    return result, text


def main(argv: Sequence[str] | None = None) -> int:
    run_and_report(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
