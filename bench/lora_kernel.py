"""Batched LoRA kernel on the CPU (`kernels.lora_add`, issue 11): µs per call of the C++ kernel against the
torch reference, and the delta's cost relative to the base projection of the same shape.

    .venv/bin/python -m bench.lora_kernel [--threads 1,2] [--dtypes bfloat16,float32] [--ranks 8,16,48]
                                          [--isa avx2] [--budget 0.03] [--record [--note TEXT]]

Cases: decode (32 tokens, one per sequence, spread over 4 adapter slots in turn) and prefill (512 tokens:
two prompts of 256, each with its own adapter), in = 576 (SmolLM2-135M's hidden size) and out = 960
(q/k/v stacked), 3072 (gate/up stacked), 576 (o); every token adapted. Columns: `C++` (the kernel,
`kernels.lora_add`), `torch ref` (`kernels.torch_ops.lora`, the definition: per slot a gather, two float32
matmuls and a scatter), their ratio, `base` (`kernels.linear` of the same [T, in] x [out, in] as the engine
calls it, with the weight packed by `kernels.pack_linear_weight` where that applies: oneDNN's layout
for 16-bit weights), and `delta / base`: what serving the adapters adds to that projection. Timings are
the fastest of 3 rounds of at least `--budget` seconds each (see `bench.quant_linear.timed`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import kernels
from bench.quant_linear import cpu_flags, timed
from bench.report import RESULTS_PATH, append_section, command_line, markdown_table
from kernels import cpu_ops
from kernels import ops as kernel_ops
from kernels.torch_ops import lora as torch_lora

IN_FEATURES = 576
OUT_FEATURES = (960, 3072, 576)
# (name, tokens, slots)
CASES = (("decode", 32, 4), ("prefill", 512, 2))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lora_kernel", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", default=str(torch.get_num_threads()), help="comma-separated thread counts"
    )
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated model dtypes")
    parser.add_argument("--ranks", default="8,16,48", help="comma-separated LoRA ranks R")
    parser.add_argument(
        "--isa", default=None, help=f"force the C++ kernel's path, one of {kernel_ops.LORA_ISAS}"
    )
    parser.add_argument("--budget", type=float, default=0.03, help="seconds per timing round (3 rounds, min)")
    parser.add_argument(
        "--heading", default="Batched LoRA kernel (issue 11)", help="--record's section title"
    )
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="file --record appends to")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. 'machine busy')")
    return parser.parse_args(argv)


def inputs(tokens: int, slots: int, out_features: int, rank: int, dtype: torch.dtype):
    """(y, x, lora_a, lora_b, token_indices, slot_offsets, weight): tokens given to the slots in turn for
    decode (one token per sequence), in contiguous runs for prefill (one prompt per slot)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, IN_FEATURES, generator=g).to(dtype)
    y = torch.randn(tokens, out_features, generator=g).to(dtype)
    lora_a = (torch.randn(slots, rank, IN_FEATURES, generator=g) / IN_FEATURES**0.5).to(dtype)
    lora_b = (torch.randn(slots, out_features, rank, generator=g) * 0.1 / rank**0.5).to(dtype)
    weight = (torch.randn(out_features, IN_FEATURES, generator=g) / IN_FEATURES**0.5).to(dtype)
    if tokens <= 64:  # decode: sequence t has slot t % slots
        slot_of = torch.arange(tokens) % slots
    else:  # prefill: a prompt per slot
        slot_of = torch.arange(tokens) * slots // tokens
    token_indices = torch.argsort(slot_of, stable=True)
    slot_offsets = torch.zeros(slots + 1, dtype=torch.int64)
    slot_offsets[1:] = torch.bincount(slot_of, minlength=slots).cumsum(0)
    return y, x, lora_a, lora_b, token_indices, slot_offsets, weight


def base_time(x: torch.Tensor, weight: torch.Tensor, budget: float) -> float:
    """µs per call of the base projection, as the engine runs it (packed weights where they apply)."""
    packed = kernels.pack_linear_weight(weight)
    return timed(lambda: kernels.linear(x, weight, packed=packed), budget)


def table(dtype: torch.dtype, ranks: Sequence[int], isa: str | None, budget: float) -> str:
    rows = []
    for name, tokens, slots in CASES:
        for out_features in OUT_FEATURES:
            base_us = None
            for rank in ranks:
                y, x, lora_a, lora_b, indices, offsets, weight = inputs(
                    tokens, slots, out_features, rank, dtype
                )
                args = (y, x, lora_a, lora_b, indices, offsets)
                with torch.inference_mode():
                    cpp_us = timed(lambda args=args: kernels.lora_add(*args, isa=isa), budget)
                    ref_us = timed(lambda args=args: torch_lora.lora_add(*args), budget)
                    if base_us is None:
                        base_us = base_time(x, weight, budget)
                rows.append(
                    [
                        name,
                        str(tokens),
                        str(slots),
                        f"{IN_FEATURES} -> {out_features}",
                        str(rank),
                        f"{cpp_us:.1f}",
                        f"{ref_us:.1f}",
                        f"{ref_us / cpp_us:.1f}x",
                        f"{base_us:.1f}",
                        f"{100 * cpp_us / base_us:.0f}%",
                    ]
                )
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    headers = (
        "case",
        "T",
        "slots",
        "in -> out",
        "R",
        "C++ µs",
        "torch ref µs",
        "ref / C++",
        "base µs",
        "delta / base",
    )
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    isas = kernel_ops.lora_isas()
    if not isas:
        raise SystemExit("the C++ CPU kernels are unavailable: nothing to measure")
    path = args.isa or kernel_ops.LORA_ISAS[kernel_ops._lora_default_isa(cpu_ops.load())]
    sections = [f"CPU: {cpu_flags()}", f"C++ path: {path} (this CPU runs {', '.join(isas)})"]
    print("\n".join(sections), flush=True)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            heading = f"{dtype_name}, {threads} thread{'s' if threads > 1 else ''}:"
            body = table(dtype, [int(r) for r in args.ranks.split(",")], args.isa, args.budget)
            sections.append(f"{heading}\n\n{body}")
            print(f"\n{heading}\n\n{body}\n", flush=True)
    if args.record:
        command = command_line("bench.lora_kernel", argv, omit=("--note", "--results", "--heading"))
        append_section(args.heading, command, args.note, "\n\n".join(sections), Path(args.results))


if __name__ == "__main__":
    main()
