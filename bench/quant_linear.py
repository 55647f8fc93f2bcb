"""Quantized linear kernels on the CPU (`kernels.quant_linear`): µs per call, per path, per row count,
at 1 and 2 threads, for SmolLM2-135M's matmul shapes, against F.linear on float32 (the ratio in each
cell) and bfloat16 weights and against torch's own weight-packed CPU matmuls.

    .venv/bin/python -m bench.quant_linear [--threads 1,2] [--rows 1,8,32] [--formats Q4_0,Q4_K]
                                           [--shapes qkv,down] [--dtypes float32] [--isa avx2]
                                           [--no-packs] [--cold] [--record [--heading TEXT]]

Columns: `F.linear f32` (float32 x and weights: the ratios' base), `F.linear bf16` (bfloat16 x and
weights), `int8pack` (`torch._weight_int8pack_mm`: int8 weights, one scale per row), `int4pack`
(`torch._weight_int4pack_mm_for_cpu`: int4 weights in groups of 32 with a scale and a zero, like
Q4_1), then per GGUF format `gemv` (the C++ GEMV on the blocks with float32 activations, the default),
`gemv int8` (the GEMV on int8-quantized activations, `activations="int8"`) and `tiles` (weight tiles
dequantized to float32 for at::mm), and for bfloat16 x also `tiles bf16` (tiles in bfloat16). The torch packs hold
requantized weights (not the GGUF file's values): they are timed, not checked, and a pack's column stops
(`-`) at larger row counts once one call took over 0.5 s. K-quants need
in_features in multiples of 256, so of SmolLM2's shapes only `down` (1536 -> 576) takes them.
Weights are random (timings do not depend on the values); x is random normal. By default every call
reads the same weights, from cache where they fit; with `--cold` each call takes the next of enough
copies (over 96 MB together, more than the L3) that its weights come from memory, as in a decode step,
which reads every weight of a model larger than the L3 once (the torch packs stay warm).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.report import RESULTS_PATH, append_section, command_line, markdown_table

# (in_features, out_features) of SmolLM2-135M's matmuls; q/k/v and gate/up are stacked, as the model runs them
SHAPES = {
    "qkv": (576, 1728),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}
FORMATS = {
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 8,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
    "Q5_0": 6,
    "Q5_1": 7,
    "F16": 1,
    "BF16": 30,
}
DEFAULT_FORMATS = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
INT8_FORMATS = frozenset({2, 3, 8, 12, 13, 14})  # those with an int8-activation GEMV
K_BYTES = {12: 144, 13: 176, 14: 210}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
SLOW_PACK_US = 5e5  # a torch pack column stops (`-`) after a call this slow: seconds per call at 512 rows
COLD_BYTES = 96 << 20  # --cold: the copies of a weight add up to more than this (the L3 is 32 MB here)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quant_linear", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument(
        "--rows", default=",".join(map(str, ROWS)), help="comma-separated activation row counts"
    )
    parser.add_argument(
        "--formats", default=",".join(DEFAULT_FORMATS), help=f"comma-separated, of {list(FORMATS)}"
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes")
    parser.add_argument(
        "--isa", default=None, help="force the kernels' instruction set (plain, avx2, avx512_vnni)"
    )
    parser.add_argument("--budget", type=float, default=0.03, help="seconds per timing round (3 rounds, min)")
    parser.add_argument("--no-packs", action="store_true", help="leave out torch's int8/int4 pack columns")
    parser.add_argument("--cold", action="store_true", help="weights read from memory at every call")
    parser.add_argument("--heading", default="Quantized linear kernels (issue 7)", help="--record's section")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="file --record appends to")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. 'machine busy')")
    return parser.parse_args(argv)


def timed(fn: Callable[[], object], budget: float) -> float:
    """µs per call: the fastest of 3 rounds, each of at least `budget` seconds and 2 calls (after a warm-up);
    for calls slower than 0.2 s, the faster of two."""
    start = time.perf_counter()
    fn()
    if (first := time.perf_counter() - start) > 0.2:
        start = time.perf_counter()
        fn()
        return min(first, time.perf_counter() - start) * 1e6
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if calls >= 2 and elapsed >= budget:
                break
        best = min(best, elapsed / calls)
    return best * 1e6


def cpu_flags() -> str:
    """The CPU's model and the vector-instruction flags that decide the kernels' paths."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags unavailable"
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?"
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    wanted = sorted(f for f in set(flags) if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    return f"{model}; flags: {' '.join(wanted)}"


def gguf_weight(qtype: int, out_features: int, in_features: int, rng: np.random.Generator) -> torch.Tensor:
    """Random GGUF blocks: quantized normal values (K-quants, which gguf cannot quantize: random bytes with
    small fp16 scales, every bit pattern being a valid block)."""
    if qtype in K_BYTES:
        blocks = rng.integers(0, 256, (out_features, in_features // 256, K_BYTES[qtype]), dtype=np.uint8)
        scale = np.full((out_features, in_features // 256, 1), 1e-2, dtype=np.float16).view(np.uint8)
        for offset in (208,) if qtype == 14 else (0, 2):
            blocks[:, :, offset : offset + 2] = scale
        return torch.from_numpy(blocks.reshape(out_features, -1))
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    values = rng.standard_normal((out_features, in_features), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(quantize(values, GGMLQuantizationType(qtype))))


def torch_packs(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """torch's own weight-packed CPU matmuls on `weight` requantized: int8 per row, int4 per group of 32."""
    out_features, in_features = weight.shape
    scales = weight.abs().amax(dim=1) / 127
    int8 = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    groups = weight.reshape(out_features, in_features // 32, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    step = (high - low).clamp_min(1e-8) / 15
    q = ((groups - low[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.reshape(out_features, in_features), 1)
    zeros = low + 8 * step  # torch's int4 weight is (q - 8) * scale + zero
    scales_zeros = torch.stack([step, zeros], dim=-1).transpose(0, 1).contiguous()
    return {
        "int8pack": lambda x: torch._weight_int8pack_mm(x, int8, scales.to(x.dtype)),
        "int4pack": lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros.to(x.dtype)),
    }


def copies_of(weight: torch.Tensor, cold: bool) -> Callable[[], torch.Tensor]:
    """A function giving `weight` at every call; with `cold`, the next of copies over `COLD_BYTES`."""
    if not cold:
        return lambda: weight
    count = max(2, math.ceil(COLD_BYTES / (weight.numel() * weight.element_size())))
    return itertools.cycle([weight.clone() for _ in range(count)]).__next__


def shape_table(
    shape: str,
    rows_list: Sequence[int],
    formats: Sequence[str],
    dtype: torch.dtype,
    budget: float,
    isa: str | None = None,
    packs: bool = True,
    cold: bool = False,
) -> tuple[str, dict[tuple[str, str, int], float]]:
    """One markdown table (row counts x paths) for one shape at the current thread count, and its timings."""
    import kernels

    in_features, out_features = SHAPES[shape]
    rng = np.random.default_rng(0)
    dense = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    dense_bf16 = copies_of(dense.bfloat16(), cold)
    columns: list[tuple[str, Callable[[torch.Tensor, torch.Tensor], object]]] = [
        ("F.linear bf16", lambda x, x32: F.linear(x.bfloat16(), dense_bf16())),
    ]
    if packs:
        packed = torch_packs(dense)
        columns.append(("int8pack", lambda x, x32: packed["int8pack"](x)))
        columns.append(("int4pack", lambda x, x32: packed["int4pack"](x)))
    # (label, path, activations)
    paths = [("gemv", "gemv", "float"), ("gemv int8", "gemv", "int8"), ("tiles", "float32", "float")]
    if dtype == torch.bfloat16:
        paths.append(("tiles bf16", "bfloat16", "float"))
    for name in formats:
        qtype = FORMATS[name]
        if in_features % (256 if qtype in K_BYTES else 32):
            continue
        qweight = copies_of(gguf_weight(qtype, out_features, in_features, rng), cold)
        for label, path, activations in paths:
            if activations == "int8" and qtype not in INT8_FORMATS:
                continue

            def call(x, x32, qweight=qweight, qtype=qtype, path=path, activations=activations):
                return kernels.quant_linear(
                    x,
                    qweight(),
                    qtype,
                    out_features,
                    in_features,
                    isa=isa,
                    path=path,
                    activations=activations,
                )

            columns.append((f"{name} {label}", call))
    dense_f32 = copies_of(dense, cold)
    timings: dict[tuple[str, str, int], float] = {}
    lines = []
    too_slow: set[str] = set()
    for rows in rows_list:
        x32 = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        x = x32.to(dtype)
        base = timed(lambda x32=x32: F.linear(x32, dense_f32()), budget)
        cells = [str(rows), f"{base:.0f}"]
        for label, fn in columns:
            if label in too_slow:
                cells.append("-")
                continue
            micros = timed(lambda fn=fn, x=x, x32=x32: fn(x, x32), budget)
            if label.startswith("int") and micros > SLOW_PACK_US:
                too_slow.add(label)
            timings[(shape, label, rows)] = micros
            cells.append(f"{micros:.0f} ({micros / base:.2f}x)")
        timings[(shape, "F.linear f32", rows)] = base
        lines.append(cells)
    headers = ["rows", "F.linear f32", *(label for label, _ in columns)]
    weights = ", weights from memory" if cold else ""
    title = f"`{shape}` {in_features} -> {out_features}: µs per call (x F.linear f32){weights}"
    return f"{title}\n\n{markdown_table(headers, lines)}", timings


def crossovers(timings: dict[tuple[str, str, int], float], rows_list: Sequence[int]) -> list[list[str]]:
    """Per shape, format and GEMV: the first row count from which tiles beat it (and stay ahead)."""
    lines = []
    for shape, name in sorted({(s, label.split()[0]) for s, label, _ in timings if label.endswith("gemv")}):
        for gemv in ("gemv", "gemv int8"):
            for tiles in ("tiles", "tiles bf16"):
                if any((shape, f"{name} {path}", rows_list[0]) not in timings for path in (gemv, tiles)):
                    continue
                faster = [
                    timings[(shape, f"{name} {tiles}", r)] < timings[(shape, f"{name} {gemv}", r)]
                    for r in rows_list
                ]
                first = next((r for i, r in enumerate(rows_list) if all(faster[i:])), None)
                lines.append([shape, name, gemv, tiles, "never" if first is None else str(first)])
    return lines


def run(args: argparse.Namespace) -> str:
    import kernels  # noqa: F401  (builds the C++ kernels before any timing)
    from kernels import cpu_ops

    if cpu_ops.load() is None:
        raise SystemExit(f"the C++ kernels are unavailable: {cpu_ops.unavailable_reason()}")
    rows_list = [int(r) for r in args.rows.split(",")]
    formats = args.formats.split(",")
    sections = [
        f"CPU: {cpu_flags()}",
        f"torch {torch.__version__}; kernels' instruction set: {args.isa or 'auto'}",
    ]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            sections.append(f"### {threads} thread{'s' if threads > 1 else ''}, x {dtype_name}")
            timings: dict[tuple[str, str, int], float] = {}
            for shape in args.shapes.split(","):
                table, found = shape_table(
                    shape, rows_list, formats, dtype, args.budget, args.isa, not args.no_packs, args.cold
                )
                timings.update(found)
                print(table + "\n", file=sys.stderr, flush=True)  # progress while the rest runs
                sections.append(table)
            crossing = markdown_table(
                ("shape", "format", "GEMV", "tiles", "tiles faster from rows"), crossovers(timings, rows_list)
            )
            sections.append(f"Crossover, GEMV -> tiles ({threads} threads, x {dtype_name})\n\n{crossing}")
    return "\n\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    text = run(args)
    print(text)
    if args.record:
        command = command_line("bench.quant_linear", argv, omit=("--note", "--results", "--heading"))
        append_section(args.heading, command, args.note, text, Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
