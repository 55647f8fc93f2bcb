"""SiLU-and-mul and GELU(tanh)-and-mul against their definitions, and the triton kernels against the torch path."""

import pytest
import torch

from kernels.torch_ops.activation import gelu_tanh_and_mul as torch_gelu_tanh_and_mul
from kernels.torch_ops.activation import silu_and_mul as torch_silu_and_mul
from kernels.triton_ops.activation import gelu_tanh_and_mul as triton_gelu_tanh_and_mul
from kernels.triton_ops.activation import silu_and_mul as triton_silu_and_mul
from tests.kernels.tolerances import tolerance


def _x(shape, dtype):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (5, 2 * 100), (2, 3, 2 * 64)])
def test_torch_path_is_silu_of_gate_times_up(shape):
    x = _x(shape, torch.float64)
    d = shape[-1] // 2
    gate, up = x[..., :d], x[..., d:]
    torch.testing.assert_close(torch_silu_and_mul(x), gate / (1 + torch.exp(-gate)) * up)


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (5, 2 * 100), (2, 3, 2 * 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_torch_path(shape, dtype):
    x = _x(shape, dtype)
    got = triton_silu_and_mul(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, torch_silu_and_mul(x), **tolerance(dtype))


@pytest.mark.parametrize("shape", [(1, 2 * 2048), (5, 2 * 100), (2, 3, 2 * 64)])
def test_gelu_torch_path_is_tanh_gelu_of_gate_times_up(shape):
    x = _x(shape, torch.float64)
    d = shape[-1] // 2
    gate, up = x[..., :d], x[..., d:]
    gelu = 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)))
    torch.testing.assert_close(torch_gelu_tanh_and_mul(x), gelu * up)


@pytest.mark.parametrize("shape", [(1, 2 * 2048), (5, 2 * 100), (2, 3, 2 * 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_triton_kernel_matches_torch_path(shape, dtype):
    x = _x(shape, dtype)
    x.view(-1)[:4] = torch.tensor([-60.0, 60.0, 0.0, -3.0])  # saturated tanh on both sides
    got = triton_gelu_tanh_and_mul(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, torch_gelu_tanh_and_mul(x), **tolerance(dtype))
