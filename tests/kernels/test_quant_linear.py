"""`kernels.quant_linear`: the C++ kernels on GGUF blocks (every path this CPU runs) against the `gguf`
package's dequantization followed by a float matmul.

Tolerance. The C++ kernels quantize each activation row to int8 per block of 32 (scale
d_x = max|x| / 127, round to nearest) and multiply integers; nothing else is approximate. Rounding moves
each x_j by at most d_x / 2, and it enters the result through the part of the weight that multiplies
the rounded activations: w_j for Q8_0 and Q4_0, w_j - m for Q4_1 (whose block minimum m multiplies the
exact block sum of x). So for each output

    |y - y_ref| <= sum_j |w_j - m_j| * d_x(j) / 2  +  1e-5 * sum_j |w_j * x_j|  +  1e-6,

the second term for float32 accumulation in another order. The bound is what activation rounding can
do at worst; the typical error is ~1/sqrt(in_features) of it. A second test puts x exactly on the int8
grid (power-of-two scales), where the quantization is lossless and the kernels must agree with the
reference to float32 rounding alone: that one catches any indexing or nibble-order mistake the
bound could hide.
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
from kernels.torch_ops import quantized as torch_quantized

gguf = pytest.importorskip("gguf")
from gguf.quants import quantize  # noqa: E402

QTYPES = {"Q8_0": quant.Q8_0, "Q4_0": quant.Q4_0, "Q4_1": quant.Q4_1}
SHAPES = [(1, 64), (7, 160), (96, 576), (300, 96)]  # (out_features, in_features), in multiples of 32
ROWS = [1, 3, 8, 33]


@pytest.fixture(scope="module")
def isas() -> tuple[str, ...]:
    found = quant.supported_isas()
    assert found, f"the C++ CPU kernels did not build: {cpu_ops.unavailable_reason()}"
    return found


def _isa_params():
    # every path is a parameter; the ones this CPU lacks are skipped, not silently dropped
    return pytest.mark.parametrize("isa", quant.ISAS)


def _require(isa: str, isas: tuple[str, ...]) -> None:
    if isa not in isas:
        pytest.skip(f"this CPU cannot run the {isa} path (it runs {isas})")


@functools.cache
def weight(
    qtype: int, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(GGUF blocks, their dequantized values, the per-element block minimum: Q4_1's m, else 0)."""
    rng = np.random.default_rng(out_features * 1000 + in_features + qtype)
    values = rng.standard_normal((out_features, in_features)).astype(np.float32)
    values *= rng.uniform(0.1, 3.0, size=(out_features, 1)).astype(np.float32)  # rows of different scales
    blocks = quantize(values, gguf.GGMLQuantizationType(qtype))
    qweight = torch.from_numpy(np.ascontiguousarray(blocks))
    dense = torch_quantized.dequantize(qweight, qtype, out_features, in_features)
    minimum = torch.zeros_like(dense)
    if qtype == quant.Q4_1:  # bytes 2-3 of each 20-byte block: m, as float16
        m = np.ascontiguousarray(blocks.reshape(out_features, -1, 20)[:, :, 2:4]).view(np.float16)
        minimum = (
            torch.from_numpy(m.astype(np.float32)).reshape(out_features, -1).repeat_interleave(32, dim=1)
        )
    return qweight, dense, minimum


def activation_step(x: torch.Tensor) -> torch.Tensor:
    """d_x of each element's block: max|x| / 127 over its 32 elements, as the kernels compute it."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    return step.expand_as(blocks).reshape(x.shape)


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, qtype: int, out_features: int, in_features: int):
    _, dense, minimum = weight(qtype, out_features, in_features)
    xd, wd = x.double(), dense.double()
    reference = xd @ wd.T
    bound = (activation_step(x).double() / 2) @ (wd - minimum.double()).abs().T
    bound += 1e-5 * (xd.abs() @ wd.abs().T) + 1e-6
    error = (y.double() - reference).abs()
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3f}x the activation-rounding bound"
    return error, bound


@_isa_params()
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("name", list(QTYPES))
def test_kernel_is_within_the_activation_rounding_bound(isas, name, out_features, in_features, rows, isa):
    _require(isa, isas)
    qtype = QTYPES[name]
    qweight, _, _ = weight(qtype, out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows + out_features))
    y = kernels.quant_linear(x, qweight, qtype, out_features, in_features, isa=isa)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    error, bound = assert_within_bound(y, x, qtype, out_features, in_features)
    # and far from the worst case on random data: rounding errors cancel
    assert error.mean() < 0.3 * bound.mean()


def grid_activations(rows: int, in_features: int, seed: int) -> torch.Tensor:
    """x = s * k, k integers in [-127, 127] with a +-127 in every block, s a power of two per block:
    the kernels' int8 quantization reproduces it exactly."""
    generator = torch.Generator().manual_seed(seed)
    k = torch.randint(-127, 128, (rows, in_features // 32, 32), generator=generator).float()
    k[:, :, 5] = 127.0 * torch.where(
        torch.rand(rows, in_features // 32, generator=generator) < 0.5, -1.0, 1.0
    )
    scale = torch.exp2(torch.randint(-9, -3, (rows, in_features // 32, 1), generator=generator).float())
    return (k * scale).reshape(rows, in_features)


@_isa_params()
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("name", list(QTYPES))
def test_kernel_is_exact_up_to_float_rounding_on_the_int8_grid(
    isas, name, out_features, in_features, rows, isa
):
    _require(isa, isas)
    qtype = QTYPES[name]
    qweight, dense, _ = weight(qtype, out_features, in_features)
    x = grid_activations(rows, in_features, seed=out_features + rows)
    y = kernels.quant_linear(x, qweight, qtype, out_features, in_features, isa=isa)
    reference = x.double() @ dense.double().T
    scale = x.double().abs() @ dense.double().abs().T
    assert ((y.double() - reference).abs() <= 1e-5 * scale + 1e-6).all()


@_isa_params()
@pytest.mark.parametrize("name", list(QTYPES))
def test_bfloat16_activations(isas, name, isa):
    _require(isa, isas)
    qtype = QTYPES[name]
    out_features, in_features = 96, 576
    qweight, _, _ = weight(qtype, out_features, in_features)
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(5)).bfloat16()
    y = kernels.quant_linear(x, qweight, qtype, out_features, in_features, isa=isa)
    assert y.dtype == torch.bfloat16
    # the float32 result is within the bound; bfloat16 output rounding adds up to 2^-9 of |y|
    exact = kernels.quant_linear(x.float(), qweight, qtype, out_features, in_features, isa=isa)
    assert_within_bound(exact, x.float(), qtype, out_features, in_features)
    torch.testing.assert_close(y.float(), exact, atol=1e-6, rtol=2.0**-8)


def test_paths_agree_with_each_other(isas):
    # the integer sums are exact on every path; only the float32 summation order differs
    qtype, out_features, in_features = quant.Q4_1, 300, 96
    qweight, _, _ = weight(qtype, out_features, in_features)
    x = torch.randn(33, in_features, generator=torch.Generator().manual_seed(1))
    results = [kernels.quant_linear(x, qweight, qtype, out_features, in_features, isa=isa) for isa in isas]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-4, rtol=1e-5)


def test_default_path_is_the_best_one_and_leading_dims_are_kept(isas):
    qtype, out_features, in_features = quant.Q8_0, 96, 576
    qweight, _, _ = weight(qtype, out_features, in_features)
    x = torch.randn(2, 3, in_features)
    y = kernels.quant_linear(x, qweight, qtype, out_features, in_features)
    assert y.shape == (2, 3, out_features)
    best = kernels.quant_linear(x.reshape(6, -1), qweight, qtype, out_features, in_features, isa=isas[-1])
    torch.testing.assert_close(y.reshape(6, -1), best, atol=0, rtol=0)


def test_torch_backend_and_unsupported_types_use_the_reference():
    out_features, in_features = 7, 160
    x = torch.randn(3, in_features)
    qweight, dense, _ = weight(quant.Q8_0, out_features, in_features)
    with kernels.use_backend("torch"):
        y = kernels.quant_linear(x, qweight, quant.Q8_0, out_features, in_features)
    torch.testing.assert_close(y, x @ dense.T, atol=1e-5, rtol=1e-5)
    q5_0 = gguf.GGMLQuantizationType.Q5_0  # no C++ kernel (yet): the torch path takes it
    values = torch.randn(out_features, in_features).numpy()
    blocks = torch.from_numpy(quantize(values, q5_0))
    y = kernels.quant_linear(x, blocks, q5_0, out_features, in_features)
    expected = x @ torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), q5_0)).T
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_gguf_reader_tensor_data_goes_in_as_it_is(tmp_path, isas):
    out_features, in_features = 7, 160
    values = np.random.default_rng(0).standard_normal((out_features, in_features)).astype(np.float32)
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, qtype in QTYPES.items():
        blocks = quantize(values, gguf.GGMLQuantizationType(qtype))
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    x = grid_activations(3, in_features, seed=3)
    for tensor in gguf.GGUFReader(str(path)).tensors:
        with warnings.catch_warnings():  # the reader's memory map is read-only; the kernels only read it
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.from_numpy(np.asarray(tensor.data))
        assert tuple(int(n) for n in tensor.shape) == (in_features, out_features)  # GGUF lists dims reversed
        y = kernels.quant_linear(x, qweight, tensor.tensor_type, out_features, in_features)
        reference = (
            x @ torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)).T
        )
        torch.testing.assert_close(y, reference, atol=1e-4, rtol=1e-5)


def test_refuses_bad_inputs(isas):
    built = cpu_ops.load()
    qweight, _, _ = weight(quant.Q4_0, 7, 160)
    x = torch.randn(2, 160)
    with pytest.raises(RuntimeError, match="rows of"):
        built.quant_linear(x, qweight.reshape(-1)[:-1].contiguous(), quant.Q4_0, 7, 160, -1)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        built.quant_linear(x[:, :150], qweight.reshape(-1), quant.Q4_0, 7, 150, -1)
    with pytest.raises(RuntimeError, match="not supported"):
        built.quant_linear(x, qweight.reshape(-1), 12, 7, 160, -1)
    if len(isas) < len(quant.ISAS):
        with pytest.raises(RuntimeError, match="cannot run"):
            built.quant_linear(x, qweight.reshape(-1), quant.Q4_0, 7, 160, len(quant.ISAS) - 1)


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
        assert "vpdpbusd" in listing and "vpmaddubsw" in listing
