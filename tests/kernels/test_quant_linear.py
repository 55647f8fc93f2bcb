"""`kernels.quant_linear`: the C++ kernels on GGUF blocks (every GEMV path this CPU runs, and the batched
path of dequantized tiles) against the `gguf` package's dequantization followed by a float64 matmul.

Tolerances, each derived from the one rounding a path adds to dequantize-then-matmul:

- Float GEMV (the default for few rows; every format). The weights are decoded to gguf's float32 values
  and multiplied with float32 activations (bfloat16 ones widened exactly), so only the float32
  summation order differs: |y - y_ref| <= 1e-5 * sum_j |w_j * x_j| + 1e-6 (k * 2^-24 is the worst case;
  random data stays far below, and 1e-5 still catches any wrong weight or activation).
- int8 GEMV (`activations="int8"`; Q4_0, Q4_1, Q8_0 and the K-quants). Each activation row is quantized to int8 per block (32 elements for Q4_0/Q4_1/Q8_0, 256 for the
  K-quants; scale d_x = max|x| / 127, round to nearest) and multiplied in integers; nothing else is
  approximate. Rounding moves each x_j by at most d_x / 2, and it enters the result through the part of
  the weight that multiplies the rounded activations: w_j, or w_j - m for Q4_1 (whose block minimum m
  multiplies the exact block sum of x). So for each output

      |y - y_ref| <= sum_j |w_j - m_j| * d_x(j) / 2  +  1e-5 * sum_j |w_j * x_j|  +  1e-6,

  the second term for float32 accumulation in another order. The typical error is ~1/sqrt(in_features)
  of the bound. A second test puts x exactly on the int8 grid (power-of-two scales), where quantizing is
  lossless and the kernels must agree with the reference to float32 rounding alone: that one catches an
  indexing or nibble-order mistake the bound could hide.
- Batched, float32 tiles: the dequantized weights are gguf's bit for bit, so only float32 accumulation
  differs: |y - y_ref| <= k * 2^-24 * sum_j |w_j * x_j| (the classic worst case for k terms).
- Batched, bfloat16 tiles: each weight rounds to bfloat16 (relative 2^-8), on top of the above.
- bfloat16 outputs round once more: + 2^-8 * |y_ref| (and the bound itself grows by that factor).

K-quant weights are random bytes with sane fp16 scales (the gguf package cannot quantize K-quants):
every bit pattern of a block is valid, and random ones exercise every bit of the layout.
"""

from __future__ import annotations

import functools
import platform
import shutil
import subprocess
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from kernels import cpu_ops
from kernels import quantized as quant

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

# the formats of the int8-activation GEMV, then those of the float paths only
INT8_QTYPES = {
    "Q4_0": quant.Q4_0,
    "Q4_1": quant.Q4_1,
    "Q8_0": quant.Q8_0,
    "Q4_K": quant.Q4_K,
    "Q5_K": quant.Q5_K,
    "Q6_K": quant.Q6_K,
}
QTYPES = {**INT8_QTYPES, "Q5_0": quant.Q5_0, "Q5_1": quant.Q5_1, "F16": quant.F16, "BF16": quant.BF16}
K_BYTES = {quant.Q4_K: 144, quant.Q5_K: 176, quant.Q6_K: 210}
ROWS = [1, 3, 8, 9, 17, 33]
# every tile size of the multi-row float GEMV (1..8 rows a pass, in one, two or four slices of each
# group on AVX2), more than a tile, and a ragged count split into uneven tiles (19: 7 + 6 + 6)
FLOAT_GEMV_ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 19]
U_BF16 = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)


def shapes(qtype: int) -> list[tuple[int, int]]:
    """(out_features, in_features): odd row counts; in_features a few blocks, and a ragged number of them."""
    return [(37, 256), (129, 768)] if qtype in K_BYTES else [(37, 96), (129, 608)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the float64 references are tiny matmuls, which two OpenMP threads on a busy
    2-core machine slowed 400x (32 ms each); `test_batched_path_tiles_many_weight_rows` runs on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def isas() -> tuple[str, ...]:
    found = quant.supported_isas()
    assert found, f"the C++ CPU kernels did not build: {cpu_ops.unavailable_reason()}"
    return found


def _require(isa: str, isas: tuple[str, ...]) -> None:
    if isa not in isas:
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {isas})")


def random_k_blocks(qtype: int, out_features: int, in_features: int, seed: int) -> np.ndarray:
    """Random K-quant blocks whose fp16 d (and dmin) are ~1e-2 times a per-row scale."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (out_features, in_features // 256, K_BYTES[qtype]), dtype=np.uint8)
    row_scale = rng.uniform(0.1, 3.0, (out_features, 1, 1))
    for offset in (208,) if qtype == quant.Q6_K else (0, 2):  # d (Q6_K: at the end), else d and dmin
        value = (rng.uniform(0.5, 1.0, (out_features, in_features // 256, 1)) * row_scale * 1e-2).astype(
            np.float16
        )
        blocks[:, :, offset : offset + 2] = value.view(np.uint8)
    return blocks.reshape(out_features, -1)


@functools.cache
def weight(
    qtype: int, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(GGUF blocks, gguf's dequantized values, the per-element block minimum: Q4_1's m, else 0)."""
    seed = out_features * 1000 + in_features + qtype
    if qtype in K_BYTES:
        blocks = random_k_blocks(qtype, out_features, in_features, seed)
    else:
        rng = np.random.default_rng(seed)
        values = rng.standard_normal((out_features, in_features)).astype(np.float32)
        values *= rng.uniform(0.1, 3.0, size=(out_features, 1)).astype(np.float32)  # rows of different scales
        blocks = quantize(values, gguf.GGMLQuantizationType(qtype))
    dense = torch.from_numpy(dequantize(blocks, gguf.GGMLQuantizationType(qtype)).astype(np.float32))
    minimum = torch.zeros_like(dense)
    if qtype == quant.Q4_1:  # bytes 2-3 of each 20-byte block: m, as float16
        m = np.ascontiguousarray(blocks.reshape(out_features, -1, 20)[:, :, 2:4]).view(np.float16)
        minimum = (
            torch.from_numpy(m.astype(np.float32)).reshape(out_features, -1).repeat_interleave(32, dim=1)
        )
    return torch.from_numpy(np.ascontiguousarray(blocks)), dense, minimum


@functools.cache
def dense64(qtype: int, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gguf's dequantized weight in float64, and its absolute values, transposed for `x @`."""
    dense = weight(qtype, out_features, in_features)[1].double().T.contiguous()
    return dense, dense.abs()


def activation_step(x: torch.Tensor, block: int) -> torch.Tensor:
    """d_x of each element's block: max|x| / 127 over its `block` elements, as the kernels compute it."""
    blocks = x.float().reshape(x.shape[0], -1, block)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    return step.expand_as(blocks).reshape(x.shape)


def bound_for(path: str, x: torch.Tensor, qtype: int, out_features: int, in_features: int) -> torch.Tensor:
    """The per-output error bound of `path` (module docstring), in float64, before any output rounding:
    "gemv" (float activations), "int8" (the int8-activation GEMV), "float32" / "bfloat16" (tiles)."""
    _, dense, minimum = weight(qtype, out_features, in_features)
    magnitude = x.double().abs() @ dense64(qtype, out_features, in_features)[1]
    if path == "gemv":
        return 1e-5 * magnitude + 1e-6
    if path == "int8":
        wd = dense.double()
        block = 256 if qtype in K_BYTES else 32
        return (
            (activation_step(x, block).double() / 2) @ (wd - minimum.double()).abs().T
            + 1e-5 * magnitude
            + 1e-6
        )
    bound = in_features * 2.0**-24 * magnitude + 1e-6
    return bound + U_BF16 * magnitude if path == "bfloat16" else bound


def check(y: torch.Tensor, x: torch.Tensor, qtype: int, out_features: int, in_features: int, path: str):
    """Assert y is within `path`'s bound of gguf's dequantize-then-matmul; returns (error, bound)."""
    assert y.shape == (x.shape[0], out_features) and y.dtype == x.dtype
    reference = x.double() @ dense64(qtype, out_features, in_features)[0]
    bound = bound_for(path, x, qtype, out_features, in_features)
    if y.dtype == torch.bfloat16:
        bound = bound * (1 + U_BF16) + U_BF16 * reference.abs()
    error = (y.double() - reference).abs()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3f}x the {path} bound"
    return error, bound


def activations(rows: int, in_features: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])


@pytest.mark.parametrize("isa", quant.ISAS)
@DTYPES
@pytest.mark.parametrize("name", list(QTYPES))
def test_float_gemv_differs_from_dequantize_then_matmul_by_the_summation_order_only(isas, name, dtype, isa):
    _require(isa, isas)
    qtype = QTYPES[name]
    for out_features, in_features in shapes(qtype):
        qweight, _, _ = weight(qtype, out_features, in_features)
        for rows in FLOAT_GEMV_ROWS:
            x = activations(rows, in_features, dtype, seed=rows + out_features)
            y = kernels.quant_linear(x, qweight, qtype, out_features, in_features, isa=isa, path="gemv")
            check(y, x, qtype, out_features, in_features, "gemv")


@pytest.mark.parametrize("isa", quant.ISAS)
@DTYPES
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", list(INT8_QTYPES))
def test_int8_gemv_is_within_the_activation_rounding_bound(isas, name, rows, dtype, isa):
    _require(isa, isas)
    qtype = QTYPES[name]
    for out_features, in_features in shapes(qtype):
        qweight, _, _ = weight(qtype, out_features, in_features)
        x = activations(rows, in_features, dtype, seed=rows + out_features)
        y = kernels.quant_linear(
            x, qweight, qtype, out_features, in_features, isa=isa, path="gemv", activations="int8"
        )
        error, bound = check(y, x, qtype, out_features, in_features, "int8")
        if dtype == torch.float32:  # and far from the worst case on random data: rounding errors cancel
            assert error.mean() < 0.3 * bound.mean()


@pytest.mark.parametrize(
    ("path", "dtype"), [("float32", torch.float32), ("float32", torch.bfloat16), ("bfloat16", torch.bfloat16)]
)
@pytest.mark.parametrize("isa", quant.ISAS)  # the dequantization's instruction set
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", list(QTYPES))
def test_batched_path_is_within_the_float_rounding_bound(isas, name, rows, path, dtype, isa):
    _require(isa, isas)
    qtype = QTYPES[name]
    for out_features, in_features in shapes(qtype):
        qweight, _, _ = weight(qtype, out_features, in_features)
        x = activations(rows, in_features, dtype, seed=rows + out_features)
        y = kernels.quant_linear(x, qweight, qtype, out_features, in_features, isa=isa, path=path)
        check(y, x, qtype, out_features, in_features, path)


def test_batched_path_tiles_many_weight_rows(isas):
    """Enough weight rows for several tiles per thread, and a last tile that is cut short."""
    qtype, out_features, in_features = quant.Q6_K, 1001, 512
    qweight, _, _ = weight(qtype, out_features, in_features)
    x = activations(20, in_features, torch.float32, seed=2)
    torch.set_num_threads(2)
    try:
        y = kernels.quant_linear(x, qweight, qtype, out_features, in_features, path="float32")
        gemv = kernels.quant_linear(x, qweight, qtype, out_features, in_features, path="gemv")
    finally:
        torch.set_num_threads(1)
    check(y, x, qtype, out_features, in_features, "float32")
    check(gemv, x, qtype, out_features, in_features, "gemv")


def grid_activations(rows: int, in_features: int, block: int, seed: int) -> torch.Tensor:
    """x = s * k, k integers in [-127, 127] with a +-127 in every block, s a power of two per block:
    the kernels' int8 quantization reproduces it exactly."""
    generator = torch.Generator().manual_seed(seed)
    k = torch.randint(-127, 128, (rows, in_features // block, block), generator=generator).float()
    k[:, :, 5] = 127.0 * torch.where(
        torch.rand(rows, in_features // block, generator=generator) < 0.5, -1.0, 1.0
    )
    scale = torch.exp2(torch.randint(-9, -3, (rows, in_features // block, 1), generator=generator).float())
    return (k * scale).reshape(rows, in_features)


@pytest.mark.parametrize("isa", quant.ISAS)
@pytest.mark.parametrize("name", list(INT8_QTYPES))
def test_int8_gemv_is_exact_up_to_float_rounding_on_the_int8_grid(isas, name, isa):
    _require(isa, isas)
    qtype = QTYPES[name]
    block = 256 if qtype in K_BYTES else 32
    for out_features, in_features in shapes(qtype):
        _, dense, _ = weight(qtype, out_features, in_features)
        for rows in range(1, 10):  # every tile size of the kernels, and a tile and one row
            x = grid_activations(rows, in_features, block, seed=out_features + rows)
            y = kernels.quant_linear(
                x,
                weight(qtype, out_features, in_features)[0],
                qtype,
                out_features,
                in_features,
                isa=isa,
                path="gemv",
                activations="int8",
            )
            reference = x.double() @ dense.double().T
            scale = x.double().abs() @ dense.double().abs().T
            assert ((y.double() - reference).abs() <= 1e-5 * scale + 1e-6).all(), f"{rows} rows"


@pytest.mark.parametrize(
    ("name", "mode"), [(name, "float") for name in QTYPES] + [(name, "int8") for name in INT8_QTYPES]
)
def test_gemv_paths_agree_with_each_other(isas, name, mode):
    # the int8 path's integer sums are exact on every path; only the float32 summation order differs
    qtype = QTYPES[name]
    out_features, in_features = shapes(qtype)[1]
    qweight, _, _ = weight(qtype, out_features, in_features)
    x = activations(11, in_features, torch.float32, seed=1)
    results = [
        kernels.quant_linear(
            x, qweight, qtype, out_features, in_features, isa=isa, path="gemv", activations=mode
        )
        for isa in isas
    ]
    scale = x.abs() @ weight(qtype, out_features, in_features)[1].abs().T
    for other in results[1:]:
        assert ((other - results[0]).abs() <= 1e-5 * scale + 1e-6).all()


def test_default_path_is_the_best_one_and_leading_dims_are_kept(isas):
    qtype, out_features, in_features = quant.Q4_K, 37, 256
    qweight, _, _ = weight(qtype, out_features, in_features)
    x = torch.randn(2, 3, in_features)
    y = kernels.quant_linear(x, qweight, qtype, out_features, in_features)
    assert y.shape == (2, 3, out_features)
    best = kernels.quant_linear(
        x.reshape(6, -1), qweight, qtype, out_features, in_features, isa=isas[-1], path="gemv"
    )
    torch.testing.assert_close(y.reshape(6, -1), best, atol=0, rtol=0)


@DTYPES
@pytest.mark.parametrize("rows", [3, 40])  # a GEMV and a batched call
def test_out_receives_the_result_in_place(isas, rows, dtype):
    qtype, out_features, in_features = quant.Q5_K, 37, 256
    qweight, _, _ = weight(qtype, out_features, in_features)
    x = activations(rows, in_features, dtype, seed=4).reshape(1, rows, in_features)
    out = torch.full((1, rows, out_features), float("nan"), dtype=dtype)
    returned = kernels.quant_linear(x, qweight, qtype, out_features, in_features, out=out)
    assert returned is out
    torch.testing.assert_close(
        out, kernels.quant_linear(x, qweight, qtype, out_features, in_features), atol=0, rtol=0
    )


def test_int8_activations_are_an_opt_in(isas):
    """Float activations by default; int8 where asked (per call or process-wide), for the formats that
    have that GEMV; the others run the float GEMV whatever is asked."""
    x = activations(3, 256, torch.float32, seed=5)
    for qtype in (quant.Q4_K, quant.Q5_0):
        qweight, _, _ = weight(qtype, 37, 256)

        def run(qweight=qweight, qtype=qtype, **options: str) -> torch.Tensor:
            return kernels.quant_linear(x, qweight, qtype, 37, 256, isa=isas[-1], **options)

        floats, int8 = run(path="gemv", activations="float"), run(path="gemv", activations="int8")
        assert torch.equal(run(), floats)
        assert quant.default_activations() == "float"
        try:
            quant.set_default_activations("int8")
            assert torch.equal(run(), int8)
        finally:
            quant.set_default_activations("float")
        assert torch.equal(int8, floats) == (qtype == quant.Q5_0)
    with pytest.raises(ValueError, match="activations must be"):
        quant.set_default_activations("int4")


@pytest.mark.parametrize("isa", quant.ISAS)
@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K", "BF16"])
def test_batch_invariant_mode_gives_a_row_the_same_bits_in_any_batch(isas, name, isa):
    """A row alone and at every position of batches up to 33 rows (GEMV tiles of every size, and where
    the default would take the batched path): bitwise equal, in float32 and bfloat16."""
    _require(isa, isas)
    qtype = QTYPES[name]
    out_features, in_features = shapes(qtype)[1]
    qweight, _, _ = weight(qtype, out_features, in_features)
    for dtype in (torch.float32, torch.bfloat16):
        batch = activations(33, in_features, dtype, seed=6)
        with kernels.batch_invariant():

            def run(x: torch.Tensor) -> torch.Tensor:
                return kernels.quant_linear(x, qweight, qtype, out_features, in_features, isa=isa)

            alone = torch.cat([run(batch[i : i + 1]) for i in range(33)])
            for size in (2, 3, 4, 5, 6, 7, 8, 9, 16, 19, 33):
                assert torch.equal(run(batch[:size]), alone[:size]), f"{size} rows"
        check(alone, batch, qtype, out_features, in_features, "gemv")


def test_torch_backend_uses_the_reference():
    out_features, in_features = 7, 160
    x = torch.randn(3, in_features)
    qweight, dense, _ = weight(quant.Q8_0, out_features, in_features)
    with kernels.use_backend("torch"):
        y = kernels.quant_linear(x, qweight, quant.Q8_0, out_features, in_features)
    torch.testing.assert_close(y, x @ dense.T, atol=1e-5, rtol=1e-5)


def test_gguf_reader_tensor_data_goes_in_as_it_is(tmp_path, isas):
    out_features, in_features = 7, 256
    values = np.random.default_rng(0).standard_normal((out_features, in_features)).astype(np.float32)
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, qtype in QTYPES.items():
        if qtype in K_BYTES:
            blocks = random_k_blocks(qtype, out_features, in_features, seed=qtype)
        else:
            blocks = quantize(values, gguf.GGMLQuantizationType(qtype))
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for tensor in gguf.GGUFReader(str(path)).tensors:
        block = 256 if int(tensor.tensor_type) in K_BYTES else 32
        x = grid_activations(3, in_features, block, seed=3)
        with warnings.catch_warnings():  # the reader's memory map is read-only; the kernels only read it
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.from_numpy(np.asarray(tensor.data))
        assert tuple(int(n) for n in tensor.shape) == (in_features, out_features)  # GGUF lists dims reversed
        reference = x @ torch.from_numpy(dequantize(np.asarray(tensor.data), tensor.tensor_type)).T
        for path in ("gemv", "float32"):
            y = kernels.quant_linear(x, qweight, tensor.tensor_type, out_features, in_features, path=path)
            torch.testing.assert_close(y, reference, atol=1e-4, rtol=1e-5)


def test_refuses_bad_inputs_with_clear_errors(isas):
    built = cpu_ops.load()
    qweight, _, _ = weight(quant.Q4_0, 7, 160)
    flat = qweight.reshape(-1)
    x = torch.randn(2, 160)
    with pytest.raises(RuntimeError, match="rows of"):
        built.quant_linear(x, flat[:-1].contiguous(), quant.Q4_0, 7, 160, -1)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        built.quant_linear(x[:, :150], flat, quant.Q4_0, 7, 150, -1)
    with pytest.raises(RuntimeError, match="not supported"):
        built.quant_linear(x, flat, 9, 7, 160, -1)  # Q8_1
    with pytest.raises(RuntimeError, match="multiple of 256"):
        built.quant_linear(x, flat, quant.Q4_K, 7, 160, -1)
    with pytest.raises(RuntimeError, match=r"x must be \[rows, in_features\]"):
        built.quant_linear(x[:, :128], flat, quant.Q4_0, 7, 160, -1)
    with pytest.raises(RuntimeError, match="bfloat16 x"):
        built.quant_linear(x, flat, quant.Q4_0, 7, 160, -1, 2)
    with pytest.raises(RuntimeError, match="out must be"):
        built.quant_linear(x, flat, quant.Q4_0, 7, 160, -1, -1, torch.empty(2, 8))
    with pytest.raises(RuntimeError, match="unavailable for GGML type 9"):  # the public function, forced
        kernels.quant_linear(x, flat, 9, 7, 160, path="gemv")
    with pytest.raises(RuntimeError, match="activations must be"):
        built.quant_linear(x, flat, quant.Q4_0, 7, 160, -1, -1, None, 2)
    with pytest.raises(ValueError, match="activations must be"):
        kernels.quant_linear(x, flat, quant.Q4_0, 7, 160, activations="int4")
    if len(isas) < len(quant.ISAS):
        with pytest.raises(RuntimeError, match="cannot run"):
            built.quant_linear(x, flat, quant.Q4_0, 7, 160, len(quant.ISAS) - 1)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="-march=x86-64 names an x86-64 CPU")
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_every_path_is_built_for_a_cpu_without_avx(tmp_path):
    """The SIMD paths are compiled under `#pragma GCC target`, so even a baseline x86-64 build holds all
    three; compiled to an object (not only `-fsyntax-only`), because instruction-set mismatches at
    inlining show up only in code generation."""
    from torch.utils import cpp_extension

    source = Path(cpu_ops.__file__).with_name("quant_linear.cpp")
    includes = [f"-I{path}" for path in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    obj = tmp_path / "quant_linear.o"
    command = ["g++", "-std=c++17", "-O1", "-c", "-march=x86-64", "-fopenmp", "-ffast-math", "-w", *includes]
    result = subprocess.run([*command, str(source), "-o", str(obj)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    if shutil.which("objdump"):
        listing = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True).stdout
        assert all(
            op in listing
            for op in (
                "vpdpbusd",
                "vpdpwssd",
                "vpmaddubsw",
                "vpmaddwd",
                "vcvtneps2bf16",
                "vpermt2ps",
                "vfmadd",
            )
        )
