"""GGUF quantized weights without numpy: the pure-torch dequantizer (`kernels.torch_ops.quantized`)
against the `gguf` package, and the triton dequantize-matmul (`kernels.triton_ops.quantized`, run by
triton's interpreter on the CPU) against that torch reference.

Tolerances. The dequantizer does the package's float32 arithmetic in the same order, so it must agree
bit for bit. The triton kernel sums the same float32 products in another order: with float32 x each
output may move by float32 rounding of the sum, bounded here by 1e-6 * sum_j |x_j * w_j|. With
bfloat16 x the kernel rounds each weight to bfloat16 for the dot (as a dense bfloat16 model stores
it), and the interpreter rounds by truncation: at most one bfloat16 ulp, 2**-7 relative, per weight
and again on the output, so the bound is 2**-7 * (sum_j |x_j * w_j| + |y|). An indexing or
nibble-order mistake moves an output by the size of the terms themselves, far beyond either bound
(and the float32 cases are tight).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import kernels
from kernels import quantized as dispatch_quantized
from kernels.mode import batch_invariant
from kernels.torch_ops import quantized as torch_quantized
from kernels.triton_ops import quantized as triton_quantized

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

Q = gguf.GGMLQuantizationType
TRITON_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
QUANTIZED = [*TRITON_TYPES, Q.Q5_0, Q.Q5_1]  # the torch path's
# byte offsets of each block's float16 scales (d, and the min / dmin where the format has one)
SCALE_OFFSETS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}


def _block_elements(qtype: Q) -> int:
    return torch_quantized.BLOCK_SIZES[int(qtype)][0]


@functools.cache
def random_blocks(qtype: Q, out_features: int, in_features: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of any content: random bytes, with finite float16 scales of a realistic size."""
    elements, nbytes = torch_quantized.BLOCK_SIZES[int(qtype)]
    rng = np.random.default_rng([seed, int(qtype), out_features, in_features])
    blocks = rng.integers(0, 256, size=(out_features, in_features // elements, nbytes), dtype=np.uint8)
    # K-quant scales multiply 6-bit sub-block scales: keep the weights around 0.01-1
    size = 0.05 if elements == 32 else 0.002
    for offset in SCALE_OFFSETS[qtype]:
        scale = rng.uniform(-size, size, size=blocks.shape[:2] + (1,)).astype(np.float16)
        blocks[..., offset : offset + 2] = scale.view(np.uint8)
    return blocks.reshape(out_features, -1)


def _expected(blocks: np.ndarray, qtype: Q, out_features: int, in_features: int) -> torch.Tensor:
    values = gguf_dequantize(blocks, qtype).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(values)).reshape(out_features, in_features)


# --- the torch dequantizer against the gguf package ---------------------------------------------------


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
@pytest.mark.parametrize("blocks_per_row", [1, 3])
def test_dequantize_random_blocks_matches_gguf_exactly(qtype, blocks_per_row):
    out_features, in_features = 5, blocks_per_row * _block_elements(qtype)
    blocks = random_blocks(qtype, out_features, in_features)
    got = torch_quantized.dequantize(torch.from_numpy(blocks), qtype, out_features, in_features)
    assert got.dtype == torch.float32 and got.shape == (out_features, in_features)
    assert torch.equal(got, _expected(blocks, qtype, out_features, in_features))


@pytest.mark.parametrize(
    "qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16, Q.F16, Q.F32], ids=lambda q: q.name
)
def test_dequantize_quantized_real_values_matches_gguf_exactly(qtype):
    """Blocks the package itself quantized from normal values (the formats it can quantize)."""
    rng = np.random.default_rng(int(qtype))
    values = (rng.standard_normal((6, 96)) * rng.uniform(0.1, 3.0, size=(6, 1))).astype(np.float32)
    blocks = np.ascontiguousarray(gguf_quantize(values, qtype))
    got = torch_quantized.dequantize(torch.from_numpy(blocks), qtype, 6, 96)
    assert torch.equal(got, _expected(blocks.view(np.uint8), qtype, 6, 96))


def test_float_passthrough_takes_raw_bytes_too():
    values = torch.randn(3, 8)
    raw = values.to(torch.bfloat16).view(torch.uint8)
    assert torch.equal(torch_quantized.dequantize(raw, int(Q.BF16), 3, 8), values.to(torch.bfloat16).float())
    assert torch.equal(torch_quantized.dequantize(values.view(torch.uint8), int(Q.F32), 3, 8), values)


def test_unsupported_type_names_it():
    with pytest.raises(ValueError, match="IQ4_NL"):
        torch_quantized.dequantize(torch.zeros(18, dtype=torch.uint8), int(Q.IQ4_NL), 1, 32)
    with pytest.raises(ValueError, match="Q3_K"):
        torch_quantized.quant_linear(torch.zeros(1, 256), torch.zeros(110, dtype=torch.uint8), 11, 1, 256)
    with pytest.raises(ValueError, match="Q5_0"):
        triton_quantized.quant_linear(torch.zeros(1, 32), torch.zeros(22, dtype=torch.uint8), 6, 1, 32)
    with pytest.raises(ValueError, match="Q2_K"):
        triton_quantized.quant_linear(torch.zeros(1, 256), torch.zeros(84, dtype=torch.uint8), 10, 1, 256)


def test_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="blocks of 256"):
        torch_quantized.dequantize(torch.zeros(144, dtype=torch.uint8), int(Q.Q4_K), 1, 128)
    with pytest.raises(ValueError, match="needs 68 bytes"):
        torch_quantized.dequantize(torch.zeros(34, dtype=torch.uint8), int(Q.Q8_0), 2, 32)


def test_torch_quant_linear_is_dequantize_then_float32_matmul():
    blocks = torch.from_numpy(random_blocks(Q.Q4_K, 9, 256))
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    weight = _expected(blocks.numpy(), Q.Q4_K, 9, 256)
    got = torch_quantized.quant_linear(x, blocks, int(Q.Q4_K), 9, 256)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 9)
    assert torch.equal(got, (x.float() @ weight.T).to(torch.bfloat16))


# --- the triton kernel against the torch reference -------------------------------------------------------


def _triton_cases():
    for qtype in TRITON_TYPES:
        widths = (256, 512) if _block_elements(qtype) == 256 else (32, 96)
        for in_features in widths:
            for rows in (1, 3, 17):
                yield pytest.param(qtype, rows, in_features, id=f"{qtype.name}-rows{rows}-in{in_features}")


def _assert_within_bound(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """`got` against x @ weight.T in float32, within the module docstring's bound for x's dtype."""
    x32 = x.float()
    expected = x32 @ weight.T
    magnitude = x32.abs() @ weight.abs().T
    if x.dtype == torch.bfloat16:
        bound = 2**-7 * (magnitude + expected.abs()) + 1e-6
    else:
        bound = 1e-6 * magnitude + 1e-6
    error = (got.float() - expected).abs()
    worst = (error - bound).argmax()
    assert bool((error <= bound).all()), (
        f"error {error.flatten()[worst]:.3g} over bound {bound.flatten()[worst]:.3g} "
        f"(output {expected.flatten()[worst]:.3g}, max error {error.max():.3g})"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("qtype", "rows", "in_features"), list(_triton_cases()))
def test_triton_kernel_matches_torch_reference(qtype, rows, in_features, dtype):
    out_features = 37  # ragged for both tile widths (32 and 64)
    blocks = torch.from_numpy(random_blocks(qtype, out_features, in_features))
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    got = triton_quantized.quant_linear(x, blocks, int(qtype), out_features, in_features)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    weight = torch_quantized.dequantize(blocks, int(qtype), out_features, in_features)
    _assert_within_bound(got, x, weight)
    reference = torch_quantized.quant_linear(x, blocks, int(qtype), out_features, in_features)
    if dtype == torch.float32:  # and the torch reference itself to float32 rounding
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_triton_kernel_keeps_leading_dims_and_takes_strided_x():
    blocks = torch.from_numpy(random_blocks(Q.Q8_0, 40, 64))
    x = torch.randn(2, 3, 128)[..., ::2]  # non-contiguous last dim
    got = triton_quantized.quant_linear(x, blocks, int(Q.Q8_0), 40, 64)
    assert got.shape == (2, 3, 40)
    _assert_within_bound(got.reshape(6, 40), x.reshape(6, 64), torch_quantized.dequantize(blocks, 8, 40, 64))
    empty = triton_quantized.quant_linear(torch.zeros(0, 64), blocks, int(Q.Q8_0), 40, 64)
    assert empty.shape == (0, 40)


def test_triton_rows_do_not_depend_on_the_batch_in_batch_invariant_mode():
    blocks = torch.from_numpy(random_blocks(Q.Q6_K, 33, 256))
    x = torch.randn(17, 256, dtype=torch.bfloat16)
    with batch_invariant():
        alone = triton_quantized.quant_linear(x[16:], blocks, int(Q.Q6_K), 33, 256)
        batched = triton_quantized.quant_linear(x, blocks, int(Q.Q6_K), 33, 256)
    assert torch.equal(alone[0], batched[16])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K], ids=lambda q: q.name)
def test_public_quant_linear_runs_the_triton_kernel_when_forced(qtype, monkeypatch):
    """`kernels.quant_linear` takes the triton path on the triton backend (CUDA tensors in "auto"), and
    keeps the torch path for formats the kernel lacks (float16 here)."""
    in_features = _block_elements(qtype)
    blocks = torch.from_numpy(random_blocks(qtype, 8, in_features))
    x = torch.randn(2, in_features)
    calls = []
    kernel = triton_quantized.quant_linear
    monkeypatch.setattr(triton_quantized, "quant_linear", lambda *args: calls.append(args) or kernel(*args))
    with kernels.use_backend("triton"):
        got = kernels.quant_linear(x, blocks, int(qtype), 8, in_features)
        dense = torch.randn(8, in_features)
        half = kernels.quant_linear(x, dense.half().view(torch.uint8), int(Q.F16), 8, in_features)
    assert len(calls) == 1 and torch.equal(got, kernel(x, blocks, int(qtype), 8, in_features))
    torch.testing.assert_close(half, x @ dense.half().float().T)
    assert dispatch_quantized.TRITON_QTYPES == triton_quantized.QTYPES
