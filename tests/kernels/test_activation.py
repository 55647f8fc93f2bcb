"""SiLU-and-mul against its definition, and the triton kernel against the torch path."""

import pytest
import torch

from kernels.torch_ops.activation import silu_and_mul as torch_silu_and_mul
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
