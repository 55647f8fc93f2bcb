"""RMSNorm with fused residual: the torch path against HF's LlamaRMSNorm, the triton kernel against it."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kernels.torch_ops import norm as torch_norm
from kernels.triton_ops import norm as triton_norm
from tests.kernels.tolerances import tolerance

SHAPES = [(1, 576), (7, 100), (3, 5, 64)]


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    residual = torch.randn(shape, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(dtype)
    return x, residual, weight


def _hf_norm(weight, eps):
    module = LlamaRMSNorm(weight.shape[0], eps=eps).to(weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_hf_llama_rmsnorm(shape, dtype):
    x, residual, weight = _inputs(shape, dtype)
    expected = _hf_norm(weight, 1e-6)(x)
    torch.testing.assert_close(torch_norm.rms_norm(x, weight, 1e-6), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_returns_norm_of_the_sum_and_the_sum(dtype):
    x, residual, weight = _inputs((4, 576), dtype)
    out, new_residual = torch_norm.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(new_residual, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(out, _hf_norm(weight, 1e-5)(x + residual), atol=0, rtol=0)
    # The inputs are left alone.
    assert torch.equal(x, _inputs((4, 576), dtype)[0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_kernel_matches_torch_path(shape, dtype, with_residual):
    x, residual, weight = _inputs(shape, dtype)
    residual = residual if with_residual else None
    got = triton_norm.rms_norm(x, weight, 1e-5, residual)
    expected = torch_norm.rms_norm(x, weight, 1e-5, residual)
    if with_residual:
        torch.testing.assert_close(got[1], expected[1], **tolerance(dtype))
        torch.testing.assert_close(got[0], expected[0], **tolerance(dtype))
    else:
        torch.testing.assert_close(got, expected, **tolerance(dtype))


def test_triton_kernel_reads_strided_rows():
    x, _, weight = _inputs((6, 128), torch.float32)
    strided = x[::2]
    torch.testing.assert_close(
        triton_norm.rms_norm(strided, weight, 1e-5), torch_norm.rms_norm(strided, weight, 1e-5)
    )


@pytest.mark.parametrize("with_residual", [False, True])
def test_batch_invariant_path_agrees_with_the_default(with_residual):
    x, residual, weight = _inputs((9, 576), torch.float32)
    residual = residual if with_residual else None
    got = torch_norm.rms_norm_batch_invariant(x, weight, 1e-5, residual)
    expected = torch_norm.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
