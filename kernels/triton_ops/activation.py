"""Gated activations: SiLU-and-mul and GELU(tanh)-and-mul, [..., 2*d] -> [..., d]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    # silu rounded to the activation dtype before the product, as the torch path's two ops are.
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gelu_tanh_and_mul_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi) * (...)
    decay = tl.exp(-2.0 * tl.abs(inner))  # in (0, 1]: no overflow for large |inner|
    tanh = tl.where(inner < 0, -1.0, 1.0) * (1.0 - decay) / (1.0 + decay)
    gelu = (0.5 * gate * (1.0 + tanh)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (gelu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as `kernels.torch_ops.activation.silu_and_mul`."""
    return _gated(silu_and_mul_kernel, x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as `kernels.torch_ops.activation.gelu_tanh_and_mul`."""
    return _gated(gelu_tanh_and_mul_kernel, x)


def _gated(kernel: triton.JITFunction, x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], d), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(d), 1024)
    kernel[(rows.shape[0], triton.cdiv(d, block))](
        rows, out, rows.stride(0), out.stride(0), d, BLOCK=block
    )
    return out.view(*x.shape[:-1], d)
