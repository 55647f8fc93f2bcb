"""What Ray Serve costs per token: one engine replica on Ray against `sansllm serve` directly.

Three ways to serve the same model on this machine, the same streams for each (8 at once by
default, greedy, a fixed output length), rounds alternated, prompts salted per run so no run
finds another's prefix in the cache:

- `sansllm serve`: the server alone (hypercorn, the ASGI shell, one engine);
- Ray, ingress: Ray's HTTP proxy -> the ingress deployment (reads the body, routes by prefix) ->
  one engine replica through a deployment handle (the default deployment, `build_app`);
- Ray, proxy direct: Ray's HTTP proxy -> the replica's ASGI app (`ingress=false`).

The engine replica gets the same CPUs as the plain server (`num_cpus` = all of them, so the same
torch threads). Besides tok/s, the CPU seconds each process spent per 1000 output tokens (from
/proc) say where the difference goes: the engine, Ray's proxy, the ingress, Ray's own daemons.

    python -m bench.ray_overhead [--rounds 2] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.hf_baseline import HFTokenizer
from bench.model_files import resolve_model
from bench.prompts import BenchPrompt, make_prompts, parse_range, with_prefix
from bench.report import append_section, command_line, fmt, markdown_table
from bench.server_process import ServerProcess, free_port
from bench.sse_client import run_clients
from bench.stats import Summary, summarize

MODEL = "SmolLM2-135M-Instruct"
SERVER_ARGS = ["--max-model-len", "2048"]
DIRECT, INGRESS, PROXY = "sansllm serve", "Ray, ingress + prefix router", "Ray, proxy direct"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=parse_range, default=(64, 256))
    parser.add_argument("--output-len", type=parse_range, default=(128, 128))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    parser.add_argument("--note", default="")
    return parser.parse_args(argv)


def role_of(pid: int, cmdline: str, bench_pid: int, server_pid: int | None) -> str | None:
    """Which part of the serving stack a process is (None: not ours to count)."""
    if pid == bench_pid:
        return "benchmark client (+ Ray driver)"
    if pid == server_pid:
        return "sansllm serve"
    for marker, role in (
        ("SansllmEngine", "engine replica"),
        ("SansllmIngress", "ingress replica"),
        ("ProxyActor", "Ray HTTP proxy"),
        ("ServeController", "Ray Serve controller"),
    ):
        if marker in cmdline:
            return role
    if "ray" in cmdline and ("raylet" in cmdline or "gcs_server" in cmdline or "ray/" in cmdline or "ray::" in cmdline):
        return "Ray daemons (GCS, raylet, agents)"
    return None


def cpu_seconds(roles: Callable[[int, str], str | None]) -> dict[str, float]:
    """User + system CPU seconds of every live process, summed by role."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = defaultdict(float)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        role = roles(int(entry.name), cmdline)
        if role is not None:
            totals[role] += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return totals


def measure(name: str, base_url: str, prompts: list[BenchPrompt], concurrency: int, roles) -> tuple[Summary, dict]:
    asyncio.run(run_clients(base_url, MODEL, prompts[:concurrency], concurrency, {"max_tokens": 8}))  # warm up
    before = cpu_seconds(roles)
    timings = asyncio.run(run_clients(base_url, MODEL, prompts, concurrency))
    after = cpu_seconds(roles)
    summary = summarize(name, timings)
    per_k = {role: 1000 * (after[role] - before.get(role, 0.0)) / summary.output_tokens for role in after}
    print(f"[ray-overhead] {name}: {summary.output_tok_s:.1f} tok/s", file=sys.stderr, flush=True)
    return summary, per_k


def salted(encode, prompts: list[BenchPrompt], salt: str) -> list[BenchPrompt]:
    return [with_prefix(encode, prompt, f"{salt} ") for prompt in prompts]


def run(args: argparse.Namespace) -> list[tuple[Summary, dict]]:
    tokenizer = HFTokenizer(resolve_model(MODEL))
    prompts = make_prompts(tokenizer.encode, args.num_prompts, args.input_len, args.output_len)
    bench_pid = os.getpid()
    results: list[tuple[Summary, dict]] = []

    def direct(round_number: int) -> None:
        with ServerProcess(MODEL, SERVER_ARGS) as server:
            roles = lambda pid, cmd: role_of(pid, cmd, bench_pid, server.pid)  # noqa: E731
            results.append(measure(DIRECT, server.base_url, salted(tokenizer.encode, prompts, f"Run {round_number}a."),
                                   args.concurrency, roles))  # fmt: skip

    import ray
    from ray import serve

    from sansllm.serve_ray import build_app

    for round_number in range(args.rounds):
        direct(round_number)
        port = free_port()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        roles = lambda pid, cmd: role_of(pid, cmd, bench_pid, None)  # noqa: E731
        for name, options in ((INGRESS, {}), (PROXY, {"ingress": "false", "routing": "pow2"})):
            app = build_app({"model": MODEL, "serve_args": " ".join(SERVER_ARGS), "num_cpus": str(os.cpu_count()),
                             **options})  # fmt: skip
            serve.run(app, name="sansllm", route_prefix="/")
            salt = f"Run {round_number}{'b' if name == INGRESS else 'c'}."
            results.append(measure(name, f"http://127.0.0.1:{port}", salted(tokenizer.encode, prompts, salt),
                                   args.concurrency, roles))  # fmt: skip
            serve.delete("sansllm")
        serve.shutdown()
        ray.shutdown()
        wait_until_gone(roles)  # the next timed run shares the CPUs with nobody
    return results


def wait_until_gone(roles: Callable[[int, str], str | None], timeout_s: float = 60.0) -> None:
    """Until no Ray process is left (they exit on their own time after `ray.shutdown()`)."""
    deadline = time.monotonic() + timeout_s
    while any(role != "benchmark client (+ Ray driver)" for role in cpu_seconds(roles)):
        if time.monotonic() > deadline:
            raise RuntimeError("Ray processes still running a minute after ray.shutdown()")
        time.sleep(0.2)  # polling /proc: there is nothing to wait on


def render(args: argparse.Namespace, results: list[tuple[Summary, dict]]) -> str:
    by_name: dict[str, list[tuple[Summary, dict]]] = defaultdict(list)
    for summary, per_k in results:
        by_name[summary.name].append((summary, per_k))
    base = sorted(s.output_tok_s for s, _ in by_name[DIRECT])[len(by_name[DIRECT]) // 2]
    rows = []
    for name, runs in by_name.items():
        speeds = [s.output_tok_s for s, _ in runs]
        median = sorted(speeds)[len(speeds) // 2]
        ttft = sorted(s.ttft_p50 for s, _ in runs)[len(runs) // 2]
        itl = sorted(s.itl_p50 for s, _ in runs)[len(runs) // 2]
        rows.append([name, " / ".join(fmt(v) for v in speeds), fmt(median), f"x{median / base:.3f}",
                     f"{ttft * 1000:.0f}", f"{itl * 1000:.1f}"])  # fmt: skip
    table = markdown_table(
        ["server", "output tok/s per round", "median", "vs sansllm serve", "TTFT p50 ms", "ITL p50 ms"], rows
    )
    roles = sorted({role for _, per_k in results for role in per_k})
    cpu_rows = []
    for name, runs in by_name.items():
        mean = {role: sum(per_k.get(role, 0.0) for _, per_k in runs) / len(runs) for role in roles}
        cpu_rows.append([name, *(f"{mean[role]:.2f}" if mean[role] >= 0.005 else "-" for role in roles),
                         f"{sum(mean.values()):.2f}"])  # fmt: skip
    cpu = markdown_table(["server", *roles, "total"], cpu_rows)
    return (
        f"{args.num_prompts} streamed completions, {args.concurrency} at once, input {args.input_len} tokens, "
        f"output {args.output_len} (ignore_eos), {args.rounds} alternated rounds, {MODEL}; the engine has all "
        f"{os.cpu_count()} CPUs in every case.\n\n{table}\n\nCPU seconds per 1000 output tokens, by process "
        f"(mean over rounds):\n\n{cpu}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    text = render(args, run(args))
    print(text)
    if args.record:
        append_section("Ray Serve overhead: one replica vs sansllm serve", command_line("bench.ray_overhead", argv),
                       args.note, text)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
