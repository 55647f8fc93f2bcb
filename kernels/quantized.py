"""Linear layers on GGUF quantized weights kept in their blocks: `quant_linear`.

On the CPU the C++ kernels of `kernels/cpu_ops/quant_linear.cpp` take Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q4_K, Q5_K, Q6_K, F16 and BF16 with float32 or bfloat16 activations: for few activation rows a GEMV on
the blocks, by default on float32 activations (the weights decoded in registers: dequantize-then-matmul
but for the float32 summation order), or with `activations="int8"` on activations quantized to int8
(integer dot products, llama.cpp's scheme: faster on VNNI CPUs, with the rounding that file states);
from more rows, tiles of weight rows dequantized into float32 (bfloat16 where x is bfloat16 and the CPU
has AVX512-BF16) and multiplied by at::mm (measurements and the choice against torch's own packed
int8/int4 matmuls: `bench/quant_linear.py`, bench/RESULTS.md). In batch-invariant mode
(`kernels.batch_invariant`) every row count takes the float GEMV, whose per-row arithmetic is the same
whatever the rows beside it. Everything else, and every call where the C++ kernels did
not build, runs the torch reference (`kernels.torch_ops.quantized`: dequantize, then matmul). On CUDA
tensors the triton kernel of `kernels/triton_ops/quantized.py` takes Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K (dequantized
in registers, tile by tile).
"""

from __future__ import annotations

import importlib
import os

import torch

from kernels import cpu_ops
from kernels.dispatch import use_cpp, use_triton
from kernels.mode import is_batch_invariant
from kernels.torch_ops import quantized as torch_quantized

# GGML type ids the C++ kernels take
F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
CPP_QTYPES = frozenset({F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16})
# in_features must be a multiple of these (F16 / BF16: the kernels read them 32 at a time)
BLOCK_ELEMENTS = {qtype: 256 if qtype in (Q4_K, Q5_K, Q6_K) else 32 for qtype in CPP_QTYPES}
# the triton kernel's (`kernels.triton_ops.quantized`), run on CUDA tensors
TRITON_QTYPES = frozenset({Q4_0, Q4_1, Q8_0, 12, 13, 14})  # + Q4_K, Q5_K, Q6_K

# the C++ kernel's paths, best last; `isa=` or SANSLLM_QUANT_ISA forces one (tests, benchmarks)
ISAS = ("plain", "avx2", "avx512_vnni")
# the C++ kernel's methods; `path=` forces one (tests, benchmarks): the GEMV on the blocks, or weight
# tiles dequantized to float32 / bfloat16 (bfloat16 x only) for at::mm
PATHS = ("gemv", "float32", "bfloat16")
# the GEMV's activations: float32 (exact but for the summation order), or int8 per block (faster with
# VNNI; Q4_0, Q4_1, Q8_0 and the K-quants only, the other formats take the float GEMV whatever is asked)
ACTIVATIONS = ("float", "int8")


def _isa_from_environment() -> int:
    # a stand-in CPU (SANSLLM_CPU_ISA, see kernels.cpu_ops) caps the path as that CPU would
    stand_in = {"avx2": "avx2", "plain": "plain"}.get(cpu_ops.target(), "")
    value = os.environ.get("SANSLLM_QUANT_ISA", "").strip().lower() or stand_in
    if not value or value == "auto":
        return -1
    if value not in ISAS:
        raise ValueError(f"SANSLLM_QUANT_ISA must be one of {('auto', *ISAS)}, got {value!r}")
    return ISAS.index(value)


def _activations_from_environment() -> str:
    value = os.environ.get("SANSLLM_QUANT_ACTIVATIONS", "").strip().lower() or "float"
    if value not in ACTIVATIONS:
        raise ValueError(f"SANSLLM_QUANT_ACTIVATIONS must be one of {ACTIVATIONS}, got {value!r}")
    return value


_forced_isa = _isa_from_environment()  # read once: this runs in every layer of every step
_default_activations = _activations_from_environment()


def set_default_activations(activations: str) -> None:
    """The GEMV's activations when a call names none: "float" (the default) or "int8" (a server flag)."""
    global _default_activations
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    _default_activations = activations


def default_activations() -> str:
    return _default_activations


def supported_isas() -> tuple[str, ...]:
    """The C++ paths this CPU can run (empty when the C++ kernels are unavailable)."""
    built = cpu_ops.load()
    if built is None:
        return ()
    return ISAS[: int(built.quant_linear_isa()) + 1]


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qtype: int,
    out_features: int,
    in_features: int,
    *,
    isa: str | None = None,
    path: str | None = None,
    out: torch.Tensor | None = None,
    activations: str | None = None,
) -> torch.Tensor:
    """`x @ dequant(qweight).T`: x [..., in_features] float32 or bfloat16 -> [..., out_features] in x's dtype.

    `qweight` is the GGUF tensor's raw data as `GGUFReader` gives it (uint8 `out_features` rows of
    blocks; F16 / BF16 tensors may come typed); `qtype` a `gguf.GGMLQuantizationType` (or its int). `isa`
    forces one C++ path ("plain", "avx2", "avx512_vnni"; an error where this CPU lacks it, or where the
    C++ kernels are unavailable); `path` one of `PATHS` (by default chosen by the row count; in
    batch-invariant mode always the float GEMV). `activations`, one of `ACTIVATIONS`, picks the GEMV's
    (by default `default_activations()`). `out`, a contiguous tensor of the result's shape and x's
    dtype, receives the result (the C++ path writes it in place).
    """
    qtype = int(qtype)
    activations = _default_activations if activations is None else activations
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if isa is None and qtype in TRITON_QTYPES and use_triton(x):
        # imported on first use, so CPU-only processes never load triton
        triton_quantized = importlib.import_module("kernels.triton_ops.quantized")
        y = triton_quantized.quant_linear(x, qweight, qtype, out_features, in_features)
        return y if out is None else out.copy_(y)
    if (
        qtype in CPP_QTYPES
        and use_cpp(x)
        and x.dtype in (torch.float32, torch.bfloat16)
        and in_features % BLOCK_ELEMENTS[qtype] == 0
        and (built := cpu_ops.load()) is not None
    ):
        forced = _forced_isa if isa is None else ISAS.index(isa)
        if path is None and is_batch_invariant():
            # one path for every row count: a row's float GEMV sums do not depend on the rows beside it
            path, activations = "gemv", "float"
        method = -1 if path is None else PATHS.index(path)
        # the engine's calls are 2-D: no reshapes then (each costs ~1.5 µs, and a step makes ~120 calls)
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, in_features)
        flat_out = out if out is None or flat else out.view(-1, out_features)
        raw = qweight if qweight.dtype == torch.uint8 else qweight.view(torch.uint8)  # F16/BF16 may be typed
        mode = 0 if activations == "float" else 1
        y = built.quant_linear(rows, raw, qtype, out_features, in_features, forced, method, flat_out, mode)
        if out is not None:
            return out
        return y if flat else y.reshape(*x.shape[:-1], out_features)
    if isa is not None or path is not None:
        raise RuntimeError(
            f"the C++ quantized path {isa or path!r} is unavailable for GGML type {qtype} and "
            f"in_features {in_features}: {cpu_ops.unavailable_reason() or 'not a C++ kernel case'}"
        )
    y = torch_quantized.quant_linear(x, qweight, qtype, out_features, in_features)
    return y if out is None else out.copy_(y)
