"""Markdown tables for the terminal and the `--record` section appended to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.stats import Summary

RESULTS_PATH = Path(__file__).with_name("RESULTS.md")

SUMMARY_HEADERS = (
    "backend", "requests", "output tokens", "elapsed s", "output tok/s", "TPOT ms",
    "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "cached prompt tokens",
)  # fmt: skip


def fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def ms(seconds: float) -> str:
    return fmt(seconds * 1000)


def summary_row(s: Summary) -> list[str]:
    return [
        s.name, str(s.requests), str(s.output_tokens), fmt(s.elapsed, 2), fmt(s.output_tok_s),
        ms(s.tpot_mean), ms(s.ttft_p50), ms(s.ttft_p99), ms(s.itl_p50), ms(s.itl_p99), str(s.cached_tokens),
    ]  # fmt: skip


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table, columns padded so it also reads well in a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in (headers, *rows)
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def command_line(module: str, argv: Sequence[str], omit: Sequence[str] = ("--note",)) -> str:
    """The command that reproduces this run, as typed from the repository root.

    Options in `omit` (with their values) change nothing measured; `--note` is recorded on its
    own line instead of inside the command.
    """
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in omit:
            skip_value = True
        elif not arg.startswith(tuple(f"{option}=" for option in omit)):
            kept.append(arg)
    return shlex.join([".venv/bin/python", "-m", module, *kept])


def cpu_flags() -> list[str]:
    """`grep -o 'avx[^ ]*' /proc/cpuinfo | sort -u`: what the CPU paths are chosen by."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({word for line in text.splitlines() if line.startswith("flags") for word in line.split()
                   if word.startswith("avx")})  # fmt: skip


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """Where a figure was measured: every recorded section carries the CPU and its flags (absolute
    times differ by tens of percent between this project's machines)."""
    import torch  # deferred: report formatting alone should not need torch

    return (
        f"{platform.machine()} {platform.system()}, {cpu_model()}, {os.cpu_count()} CPUs, CPU flags "
        f"`{' '.join(cpu_flags()) or 'unknown'}`, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {sys.version.split()[0]}"
    )


def append_section(title: str, command: str, note: str, body: str, path: Path = RESULTS_PATH) -> None:
    """Append one dated result section: what ran, where, under which conditions, and the numbers."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"## {title} ({stamp})", f"Command: `{command}`", f"Machine: {machine_line()}"]
    if note:
        parts.append(f"Note: {note}")
    parts.append(body.strip("\n"))
    with path.open("a", encoding="utf-8") as results:
        results.write("\n" + "\n\n".join(parts) + "\n")
