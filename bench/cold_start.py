"""Cold start: `sansllm serve` from launch to a healthy `GET /health`, phase by phase.

    python -m bench.cold_start                      # SmolLM2 alone, then the default two-model start
    python -m bench.cold_start --runs 3 --config smollm2
    python -m bench.cold_start --repo /tmp/old-checkout   # the same measurement of another checkout

Each configuration starts the server `--runs` times in a row with one model cache folder
(`SANSLLM_CACHE`), fresh for the configuration unless `--keep-cache`: run 1 is a first start on
the machine (it unpacks packaged models and converts the GGUF tokenizer into the cache; the OS
file cache is not dropped), later runs are second starts, the ones the issue's target is about.

The phases come from the server's own log lines (timestamps to the millisecond): the launcher's
`bound` line, the engine's `loading X from` lines, the loader's per-phase `X: ... in N s` lines,
`serving X` and hypercorn's `Running on`; the segment between two lines is named by what the
second one ends. What the engine does after a model's loader returns (weight packing,
`kernels.prepare`, the KV cache) has no line of its own and is the segment up to the next
model's line. A checkout without the loader's lines shows each model's load as one segment.

The C++ CPU kernels are built into torch's extension cache, one folder per Python and torch
(`kernels.cpu_ops.build_directory`), so two checkouts with different kernel sources on one machine
rebuild each other's build (a minute here) on every start. Unless TORCH_EXTENSIONS_DIR is set, the
benchmark gives each checkout its own folder (`~/.cache/torch_extensions/cold-start-<hash>`): the
first start of a checkout builds, later ones measure what a machine with one checkout sees.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from bench.report import cpu_flags
from bench.server_process import REPO_ROOT, free_port, sansllm_command

CONFIGS = {
    "smollm2": ["SmolLM2-135M-Instruct"],
    "default": [],  # no model argument: SmolLM2-135M-Instruct and all-MiniLM-L6-v2
}
POLL_S = 0.02

_LINE = re.compile(
    r"^(?P<level>[A-Z]+) (?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<name>[\w.]+): (?P<msg>.*)$"
)
_HYPERCORN = re.compile(r"^\[(?P<stamp>[^\]]+)\] \[\d+\] \[INFO\] Running on ")


@dataclass
class Run:
    total_s: float
    phases: list[tuple[str, float]] = field(default_factory=list)
    log: str = ""


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def phases_from_log(log: str, launched: float, healthy: float) -> list[tuple[str, float]]:
    """(phase, seconds) segments from launch to healthy, named by the log line that ends each one."""
    events: list[tuple[float, str]] = []
    current: str | None = None  # the model being built by the engine
    loader_seen: set[str] = set()
    models: list[str] = []

    def rest_of(model: str) -> str:
        if model in loader_seen:
            return f"{model}: pack weights, kernels.prepare, KV cache"
        return f"{model}: load (weights, tokenizer), pack, kernels, KV cache"

    for line in log.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        at, name, msg = _stamp(match["stamp"]), match["name"], match["msg"]
        if name == "sansllm.launch" and msg.startswith("bound "):
            events.append((at, "python start + CLI imports (sansllm, protocol, hypercorn), bind"))
        elif name == "sansllm.assemble" and msg.startswith("loading model "):
            events.append((at, "import engine (torch, kernels, models)"))
        elif name == "engine.engine" and msg.startswith("loading "):
            model = msg.removeprefix("loading ").split(" from ", 1)[0]
            if current is None:
                events.append((at, "resolve model, engine thread"))
            else:
                events.append((at, rest_of(current)))
            current = model
            models.append(model)
        elif name == "engine.loader" and ": " in msg and re.search(r" in \d+\.\d+ s$", msg):
            model, what = msg.split(": ", 1)
            loader_seen.add(model)
            events.append((at, f"{model}: {re.sub(r' in [0-9.]+ s$', '', what)}"))
        elif name == "sansllm.assemble" and msg.startswith("serving ") and current is not None:
            events.append((at, rest_of(current)))
            current = None
        elif name == "hypercorn.error" and msg.startswith("Running on"):
            events.append((at, "ASGI app, hypercorn start"))
    events.append((healthy, "first healthy GET /health"))
    phases: list[tuple[str, float]] = []
    previous = launched
    for at, label in events:
        at = max(at, previous)  # log stamps are to the ms: never a negative segment
        if phases and phases[-1][0] == label:
            phases[-1] = (label, phases[-1][1] + at - previous)
        else:
            phases.append((label, at - previous))
        previous = at
    return phases


def start_once(models: list[str], repo: Path, cache: Path, timeout_s: float) -> Run:
    port = free_port()
    command = [*sansllm_command(), "serve", *models, "--host", "127.0.0.1", "--port", str(port)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(repo), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        ),
        "SANSLLM_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(extensions_dir(repo)),
    }
    with tempfile.NamedTemporaryFile("w+", prefix="sansllm-cold-", suffix=".log") as log:
        launched = time.time()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=repo)
        try:
            deadline = time.monotonic() + timeout_s
            with httpx.Client(timeout=5.0) as client:
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"server exited with {process.returncode}:\n{Path(log.name).read_text()[-3000:]}"
                        )
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"not healthy after {timeout_s} s:\n{Path(log.name).read_text()[-3000:]}"
                        )
                    try:
                        if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass  # not listening yet (the port is bound early; the app answers once loaded)
                    time.sleep(POLL_S)  # polling a subprocess: there is nothing to wait on
            healthy = time.time()
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        text = Path(log.name).read_text(errors="replace")
    return Run(healthy - launched, phases_from_log(text, launched, healthy), text)


def extensions_dir(repo: Path) -> Path:
    """This checkout's own torch extension cache (see the module's docstring)."""
    digest = hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"cold-start-{digest}"


def table(name: str, runs: list[Run]) -> str:
    """Markdown: each phase's seconds in every run, and its share of the last run's total."""
    labels: list[str] = []
    for run in runs:
        for label, _ in run.phases:
            if label not in labels:
                labels.append(label)
    last = runs[-1]
    head = " | ".join(f"run {i} s" for i in range(1, len(runs) + 1))
    lines = [
        f"**{name}**",
        "",
        f"| phase | {head} | share of run {len(runs)} |",
        "|---|" + "---:|" * (len(runs) + 1),
    ]
    for label in labels:
        values = [dict(_summed(run.phases)).get(label) for run in runs]
        cells = " | ".join("" if v is None else f"{v:.2f}" for v in values)
        share = dict(_summed(last.phases)).get(label)
        lines.append(f"| {label} | {cells} | {'' if share is None else f'{share / last.total_s:.0%}'} |")
    totals = " | ".join(f"**{run.total_s:.2f}**" for run in runs)
    lines.append(f"| **launch to healthy /health** | {totals} | 100% |")
    return "\n".join(lines)


def _summed(phases: list[tuple[str, float]]) -> list[tuple[str, float]]:
    out: dict[str, float] = {}
    for label, seconds in phases:
        out[label] = out.get(label, 0.0) + seconds
    return list(out.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=2, help="starts per configuration (run 2 on is a second start)"
    )
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument(
        "--repo", type=Path, default=REPO_ROOT, help="the checkout to start (default: this one)"
    )
    parser.add_argument(
        "--keep-cache", action="store_true", help="use $SANSLLM_CACHE as it is, not a fresh one"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--show-log", action="store_true", help="print each run's server log")
    args = parser.parse_args(argv)
    names = list(CONFIGS) if args.config == "all" else [args.config]
    print(f"# cold start of {args.repo.resolve()} (python -m bench.cold_start {' '.join(sys.argv[1:])})")
    print(f"cpu: {os.cpu_count()} cores; flags: {' '.join(cpu_flags())}; load average {os.getloadavg()[0]:.2f}\n")
    for name in names:
        with tempfile.TemporaryDirectory(prefix="sansllm-cold-cache-") as fresh:
            cache = (
                Path(os.environ["SANSLLM_CACHE"])
                if args.keep_cache and "SANSLLM_CACHE" in os.environ
                else Path(fresh)
            )
            if args.keep_cache and "SANSLLM_CACHE" not in os.environ:
                cache = Path.home() / ".cache" / "sansllm"
            runs = []
            for _ in range(args.runs):
                run = start_once(CONFIGS[name], args.repo.resolve(), cache, args.timeout)
                if args.show_log:
                    print(run.log)
                runs.append(run)
        title = f"`sansllm serve {' '.join(CONFIGS[name]) or '(default: SmolLM2-135M-Instruct + all-MiniLM-L6-v2)'}`"
        print(table(title, runs))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
