"""The CPU's packed-weight linear gives exactly what `F.linear` gives on the plain weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.torch_ops import linear as torch_linear


def _cpu_packs(dtype: torch.dtype) -> bool:
    check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported}.get(dtype)
    return torch.backends.mkldnn.is_available() and check is not None and check()


@pytest.mark.parametrize("rows", [0, 1, 7, 32, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_bfloat16_linear_equals_plain(rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=generator).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(rows, 80, generator=generator).bfloat16()
    packed = kernels.pack_linear_weight(weight)
    assert (packed is not None) == _cpu_packs(torch.bfloat16)
    torch.testing.assert_close(kernels.linear(x, weight, bias, packed), F.linear(x, weight, bias), atol=0, rtol=0)


def test_float32_weights_stay_plain_unless_asked():
    """float32 goes through MKL's sgemm, which packing does not speed up on decode rows."""
    assert kernels.pack_linear_weight(torch.randn(8, 8)) is None


@pytest.mark.parametrize("rows", [1, 33, 700])
def test_packed_float32_linear_matches_plain(rows):
    """Asked for (encoders), float32 packs into oneDNN's layout: a different sgemm, same sums up to rounding."""
    generator = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 80, generator=generator), torch.randn(96, generator=generator)
    x = torch.randn(rows, 80, generator=generator)
    packed = kernels.pack_linear_weight(weight, float32=True)
    assert (packed is not None) == torch.backends.mkldnn.is_available()
    torch.testing.assert_close(kernels.linear(x, weight, bias, packed), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_batch_invariant_mode_packs_nothing_and_refuses_freed_weights():
    weight = torch.randn(16, 8).bfloat16()
    with kernels.batch_invariant():
        assert kernels.pack_linear_weight(weight) is None
    packed = torch_linear.pack_weight(weight)
    if packed is None:
        assert not _cpu_packs(torch.bfloat16)
        return
    with kernels.batch_invariant(), pytest.raises(RuntimeError, match="packed for the default mode"):
        kernels.linear(torch.randn(2, 8).bfloat16(), weight.new_empty(0), None, packed)
