"""`kernels.lora_add`: many LoRA adapters over one batch. Every backend (the C++ kernel on each instruction
set this CPU runs, the triton kernels under the interpreter, the dispatch's default) against the torch
reference over shapes, dtypes, ranks and slot layouts; rows outside every slot stay bitwise untouched; a
row's result is bitwise the same in any batch; bad inputs are refused.

Data: x ~ N(0, 1), A ~ N(0, 1/in), B ~ N(0, 1/R), y ~ N(0, 1), so the delta is as large as y and a wrong
delta (slot, row, rank) cannot hide under a 16-bit rounding. Tolerances (`tests/kernels/tolerances.py`):
the kernels sum in another order than the reference's float32 matmuls (far below float32's 1e-5 here),
so a 16-bit output may round one ulp the other way; triton's interpreter truncates to bfloat16 (one more
ulp).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import kernels
from kernels import cpu_ops
from kernels import ops as kernel_ops
from kernels.torch_ops import lora as torch_lora
from tests.kernels.tolerances import tolerance

DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"]
)


@dataclass(frozen=True)
class Case:
    tokens: int
    in_features: int
    out_features: int
    rank: int
    slots: int
    layout: str  # how tokens spread over slots, see `slot_of`
    small: bool = True  # small enough for triton's interpreter


CASES = {
    # SmolLM2's q/k/v and o shapes at decode: 32 tokens over 4 slots (every 5th token the base model's)
    "decode_qkv": Case(32, 576, 960, 16, 4, "interleaved", small=False),
    "decode_r48": Case(32, 576, 576, 48, 5, "interleaved", small=False),
    # a prefill: several token ranges of one slot, the output split in tiles
    "prefill": Case(300, 200, 130, 48, 2, "one_slot", small=False),
    "interleaved": Case(20, 48, 70, 5, 3, "interleaved"),
    "empty_slots": Case(13, 100, 37, 3, 5, "empty_slots"),  # in and out not multiples of any vector
    "rank_1": Case(9, 64, 64, 1, 2, "one_slot"),
    "rank_64": Case(17, 40, 33, 64, 2, "interleaved"),
    "half_adapted": Case(24, 32, 80, 8, 2, "half_adapted"),
    "no_tokens": Case(5, 32, 32, 4, 3, "none"),
    "leading_unused": Case(12, 48, 40, 8, 2, "leading_unused"),  # slot_offsets[0] > 0
}


def slot_of(case: Case) -> list[int]:
    """Each token's slot, -1 for the base model's."""
    t, s = case.tokens, case.slots
    return {
        "interleaved": [i % (s + 1) - 1 for i in range(t)],
        "one_slot": [s - 1] * t,
        "empty_slots": [(0, 2, 4)[i % 3] if s > 4 else 0 for i in range(t)],
        "half_adapted": [i % s if i < t // 2 else -1 for i in range(t)],
        "none": [-1] * t,
        "leading_unused": [i % s if i >= 2 else -1 for i in range(t)],
    }[case.layout]


def grouping(slots: list[int], num_slots: int, lead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_indices, slot_offsets) for each token's slot: grouped by slot, each group in reverse row
    order (any order within a group is valid); `lead` base rows listed first, outside every slot."""
    base = [t for t, s in enumerate(slots) if s < 0]
    order = base[:lead] + [t for s in range(num_slots) for t in reversed(range(len(slots))) if slots[t] == s]
    counts = [sum(1 for x in slots if x == s) for s in range(num_slots)]
    offsets = [lead]
    for count in counts:
        offsets.append(offsets[-1] + count)
    return torch.tensor(order, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def make(case: Case, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t, i, o, r, s = case.tokens, case.in_features, case.out_features, case.rank, case.slots
    x = torch.randn(t, i, generator=g).to(dtype)
    y = torch.randn(t, o, generator=g).to(dtype)
    lora_a = (torch.randn(s, r, i, generator=g) / i**0.5).to(dtype)
    lora_b = (torch.randn(s, o, r, generator=g) / r**0.5).to(dtype)
    slots = slot_of(case)
    indices, offsets = grouping(slots, s, lead=2 if case.layout == "leading_unused" else 0)
    return y, x, lora_a, lora_b, indices, offsets, slots


def reference(y, *args) -> torch.Tensor:
    out = y.clone()
    torch_lora.lora_add(out, *args)
    return out


def _cpp_isas() -> tuple[str, ...]:
    return kernel_ops.lora_isas()


BACKENDS = ["auto", *(f"cpp-{isa}" for isa in kernel_ops.LORA_ISAS), "triton"]


def run_backend(backend: str, y, *args) -> None:
    """kernels.lora_add(y, *args) on `backend`: "auto" (the dispatch's choice), "cpp-<isa>", "triton"."""
    if backend.startswith("cpp-"):
        isa = backend.removeprefix("cpp-")
        if isa not in _cpp_isas():
            pytest.skip(f"this CPU cannot run the {isa} path (it runs {_cpp_isas()})")
        kernels.lora_add(y, *args, isa=isa)
    elif backend == "triton":
        with kernels.use_backend("triton"):
            kernels.lora_add(y, *args)
    else:
        kernels.lora_add(y, *args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@DTYPES
def test_every_backend_matches_the_reference(backend, name, dtype):
    case = CASES[name]
    if backend == "triton" and not case.small:
        pytest.skip("too large for triton's interpreter")
    y, x, lora_a, lora_b, indices, offsets, slots = make(case, dtype)
    expected = reference(y, x, lora_a, lora_b, indices, offsets)
    got = y.clone()
    run_backend(backend, got, x, lora_a, lora_b, indices, offsets)
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base_rows], y[base_rows]), "a base model row changed"
    torch.testing.assert_close(got, expected, **tolerance(dtype))


@DTYPES
def test_reference_rounds_once_after_a_float32_delta(dtype):
    """The reference against float64 arithmetic: the delta exact but for float32 rounding, y + delta rounded
    once to y's dtype (so at most one ulp of y's dtype away, plus float32 noise)."""
    y, x, lora_a, lora_b, indices, offsets, slots = make(CASES["interleaved"], dtype, seed=3)
    got = reference(y, x, lora_a, lora_b, indices, offsets)
    expected = y.double().clone()
    for t, s in enumerate(slots):
        if s >= 0:
            expected[t] += (x[t].double() @ lora_a[s].double().T) @ lora_b[s].double().T
    ulp = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert ((got.double() - expected).abs() <= ulp * expected.abs() + 1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_are_read_and_written_in_place(backend):
    """x, A and B as row-strided views, y as a column slice of a wider buffer and as a transposed view."""
    case = CASES["interleaved"]
    y, x, lora_a, lora_b, indices, offsets, _ = make(case, torch.float32, seed=1)
    expected = reference(y, x, lora_a, lora_b, indices, offsets)
    wide_x = torch.zeros(case.tokens, case.in_features + 7)
    wide_x[:, 3 : 3 + case.in_features] = x
    wide_a = torch.zeros(case.slots, case.rank + 2, case.in_features + 5)
    wide_a[:, 1 : 1 + case.rank, : case.in_features] = lora_a
    wide_b = torch.zeros(case.slots + 1, case.out_features, case.rank + 3)
    wide_b[1:, :, 2 : 2 + case.rank] = lora_b
    views = (wide_x[:, 3 : 3 + case.in_features], wide_a[:, 1 : 1 + case.rank, : case.in_features])
    views += (wide_b[1:, :, 2 : 2 + case.rank],)
    wide_y = torch.full((case.tokens, case.out_features + 6), 7.0)
    wide_y[:, 2 : 2 + case.out_features] = y
    column_slice = wide_y[:, 2 : 2 + case.out_features]
    transposed = y.t().contiguous().t()  # stride (1, T): columns not contiguous
    for target in (column_slice, transposed):
        run_backend(backend, target, *views, indices[:], offsets)
        torch.testing.assert_close(target, expected, **tolerance(torch.float32))
    assert (wide_y[:, :2] == 7.0).all() and (wide_y[:, 2 + case.out_features :] == 7.0).all()


# (batch size, the row's position); the other rows spread over all slots, the row's among them
BATCH_SIZES_AND_POSITIONS = [(1, 0), (2, 1), (3, 0), (7, 5), (9, 8), (16, 3), (33, 20), (100, 63)]


@pytest.mark.parametrize("backend", ["torch", *(f"cpp-{isa}" for isa in kernel_ops.LORA_ISAS), "triton"])
@pytest.mark.parametrize("invariant", [True, False], ids=["batch_invariant", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_row_is_bitwise_identical_in_any_batch(backend, invariant, dtype):
    """A row's delta alone and among other rows of its own and other slots: the same bits. The C++ and
    triton kernels by construction in either mode; the torch path in batch-invariant mode."""
    if backend == "torch" and not invariant:
        pytest.skip("the default torch path uses BLAS, whose kernels change with the row count")
    in_features, out_features, rank, num_slots = (48, 70, 6, 3) if backend == "triton" else (200, 150, 12, 3)
    sizes = BATCH_SIZES_AND_POSITIONS[:5] if backend == "triton" else BATCH_SIZES_AND_POSITIONS
    g = torch.Generator().manual_seed(7)
    lora_a = (torch.randn(num_slots, rank, in_features, generator=g) / in_features**0.5).to(dtype)
    lora_b = (torch.randn(num_slots, out_features, rank, generator=g) / rank**0.5).to(dtype)
    row = torch.randn(in_features, generator=g).to(dtype)
    y_row = torch.randn(out_features, generator=g).to(dtype)

    def compute(size: int, position: int) -> torch.Tensor:
        x = torch.randn(size, in_features, generator=g).to(dtype)
        y = torch.randn(size, out_features, generator=g).to(dtype)
        x[position], y[position] = row, y_row
        slots = [t % num_slots for t in range(size)]
        slots[position] = 1
        indices, offsets = grouping(slots, num_slots)
        args = (y, x, lora_a, lora_b, indices, offsets)
        with kernels.batch_invariant(invariant):
            if backend == "torch":
                with kernels.use_backend("torch"):
                    kernels.lora_add(*args)
            else:
                run_backend(backend, *args)
        return y[position]

    alone = compute(1, 0)
    for size, position in sizes[1:]:
        assert torch.equal(compute(size, position), alone), f"row {position} of {size}"


def test_batch_invariant_torch_path_matches_the_reference():
    y, x, lora_a, lora_b, indices, offsets, _ = make(CASES["interleaved"], torch.float32, seed=2)
    got = y.clone()
    with kernels.use_backend("torch"), kernels.batch_invariant():
        kernels.lora_add(got, x, lora_a, lora_b, indices, offsets)
    torch.testing.assert_close(
        got, reference(y, x, lora_a, lora_b, indices, offsets), **tolerance(torch.float32)
    )


def test_torch_backend_is_the_reference_and_mixed_dtypes_take_it():
    y, x, lora_a, lora_b, indices, offsets, _ = make(CASES["interleaved"], torch.bfloat16, seed=4)
    expected = reference(y, x, lora_a, lora_b, indices, offsets)
    got = y.clone()
    with kernels.use_backend("torch"):
        kernels.lora_add(got, x, lora_a, lora_b, indices, offsets)
    assert torch.equal(got, expected)
    got = y.clone()  # float32 adapters on bfloat16 activations: the C++ kernel wants one dtype, torch serves
    kernels.lora_add(got, x, lora_a.float(), lora_b.float(), indices, offsets)
    assert torch.equal(got, reference(y, x, lora_a.float(), lora_b.float(), indices, offsets))


def test_a_stand_in_cpu_caps_the_default_path(monkeypatch):
    """SANSLLM_CPU_ISA=avx2 (or plain) builds as for that CPU, and the default path stays within it."""
    if len(_cpp_isas()) < 2:
        pytest.skip("this CPU runs the plain path only")
    y, x, lora_a, lora_b, indices, offsets, _ = make(CASES["decode_qkv"], torch.float32, seed=5)
    forced = y.clone()
    kernels.lora_add(forced, x, lora_a, lora_b, indices, offsets, isa="avx2")
    monkeypatch.setattr(kernel_ops, "_lora_auto_isa", {})
    monkeypatch.setattr(cpu_ops, "target", lambda: "avx2")
    assert kernel_ops._lora_default_isa(cpu_ops.load()) == 1
    default = y.clone()
    kernels.lora_add(default, x, lora_a, lora_b, indices, offsets)
    assert torch.equal(default, forced)


def test_bad_inputs_are_refused_with_clear_errors():
    y, x, lora_a, lora_b, indices, offsets, _ = make(CASES["interleaved"], torch.float32)
    n = indices.shape[0]
    with pytest.raises(RuntimeError, match="appears twice"):
        kernels.lora_add(y.clone(), x, lora_a, lora_b, torch.cat([indices[:-1], indices[:1]]), offsets)
    with pytest.raises(RuntimeError, match="outside"):
        bad = indices.clone()
        bad[0] = y.shape[0]
        kernels.lora_add(y.clone(), x, lora_a, lora_b, bad, offsets)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        kernels.lora_add(y.clone(), x, lora_a, lora_b, indices, torch.tensor([0, 5, 3, n]))
    with pytest.raises(RuntimeError, match="within"):
        kernels.lora_add(y.clone(), x, lora_a, lora_b, indices, torch.tensor([0, 1, 2, n + 1]))
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.lora_add(y.clone(), x, lora_a, lora_b[:, :-1], indices, offsets)
    with pytest.raises(RuntimeError, match="S \\+ 1"):
        kernels.lora_add(y.clone(), x, lora_a, lora_b, indices, offsets[:-1])
    with pytest.raises(ValueError, match="isa must be"):
        kernels.lora_add(y.clone(), x, lora_a, lora_b, indices, offsets, isa="avx9")
    with pytest.raises(RuntimeError, match="unavailable"):
        kernels.lora_add(y.clone(), x, lora_a.double(), lora_b.double(), indices, offsets, isa="plain")
    with kernels.use_backend("torch"):
        with pytest.raises(ValueError, match="non-decreasing"):
            kernels.lora_add(y.clone(), x, lora_a, lora_b, indices, torch.tensor([0, 5, 3, n]))
        with pytest.raises(ValueError, match="do not fit"):
            kernels.lora_add(y.clone(), x, lora_a, lora_b[:, :-1], indices, offsets)
        with pytest.raises(ValueError, match="int64"):
            kernels.lora_add(y.clone(), x, lora_a, lora_b, indices.int(), offsets)
    if len(_cpp_isas()) < len(kernel_ops.LORA_ISAS):
        with pytest.raises(RuntimeError, match="cannot run"):
            kernels.lora_add(y.clone(), x, lora_a, lora_b, indices, offsets, isa=kernel_ops.LORA_ISAS[-1])


def test_cpu_calls_never_import_triton():
    script = (
        "import sys, torch, kernels\n"
        "y, x = torch.zeros(3, 8), torch.randn(3, 16)\n"
        "kernels.lora_add(y, x, torch.randn(2, 4, 16), torch.randn(2, 8, 4), torch.tensor([2, 0]),"
        " torch.tensor([0, 1, 2]))\n"
        "assert y[1].abs().sum() == 0 and y[0].abs().sum() > 0\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {
        key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "SANSLLM_KERNELS")
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
