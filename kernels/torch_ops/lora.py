"""Batched LoRA: many adapters over one base model in one batch (punica / S-LoRA), the torch reference.

Each token row t that adapter slot s holds gets its delta added to the base output in place:

    y[t] = round(y[t] + (x[t] @ A[s].T) @ B[s].T)

with both products in float32 (the [n, R] intermediate stays float32) and one rounding to y's dtype per
element at the end. This module is the definition the C++ (`kernels/cpu_ops/lora.cpp`) and triton
(`kernels/triton_ops/lora.py`) kernels are tested against. The engine folds the scaling (alpha / r) into B
and zero-pads a smaller adapter's A rows and B columns to the slots' common rank R.
"""

from __future__ import annotations

import torch

from kernels.torch_ops import linear as torch_linear


def check_lora_args(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_indices: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """Shape and dtype checks shared by every backend (none reads the data: no device sync on CUDA)."""
    if y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y and x must be [T, out] and [T, in] with the same T, got {tuple(y.shape)}, {tuple(x.shape)}"
        )
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError("lora_a must be [S, R, in] and lora_b [S, out, R]")
    slots, rank, in_features = lora_a.shape
    if in_features != x.shape[1] or tuple(lora_b.shape) != (slots, y.shape[1], rank):
        raise ValueError(
            f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} do not fit x {tuple(x.shape)} "
            f"and y {tuple(y.shape)}: expected [S, R, in] and [S, out, R]"
        )
    if token_indices.dim() != 1 or token_indices.dtype != torch.int64:
        raise ValueError("token_indices must be a 1-D int64 tensor")
    if slot_offsets.dim() != 1 or slot_offsets.dtype != torch.int64 or slot_offsets.shape[0] != slots + 1:
        raise ValueError(f"slot_offsets must be a 1-D int64 tensor of S + 1 = {slots + 1} offsets")


def _delta(
    rows: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch_invariant: bool
) -> torch.Tensor:
    """(rows @ A.T) @ B.T in float32."""
    rows, lora_a, lora_b = rows.float(), lora_a.float(), lora_b.float()
    if batch_invariant:
        linear = torch_linear.linear_batch_invariant
        return linear(linear(rows, lora_a), lora_b)
    return torch.mm(torch.mm(rows, lora_a.t()), lora_b.t())


def lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_indices: torch.Tensor,
    slot_offsets: torch.Tensor,
    *,
    batch_invariant: bool = False,
) -> None:
    """Add each adapted token's LoRA delta into y [T, out] in place (see the module docstring).

    x [T, in]; lora_a [S, R, in]; lora_b [S, out, R]; token_indices int64 [N], the rows of x / y that use
    an adapter grouped by slot: `token_indices[slot_offsets[s]:slot_offsets[s + 1]]` use slot s
    (slot_offsets int64 [S + 1], non-decreasing, within [0, N]). A row appears at most once; rows not
    listed (the base model's tokens) are left as they are. `batch_invariant`: the matmuls run in fixed
    tiles (`linear_batch_invariant`), so a row's result does not depend on the rows sharing its slot.
    """
    check_lora_args(y, x, lora_a, lora_b, token_indices, slot_offsets)
    offsets = slot_offsets.tolist()
    if (
        offsets[0] < 0
        or offsets[-1] > token_indices.shape[0]
        or any(a > b for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    ):
        raise ValueError(
            f"slot_offsets must be non-decreasing within [0, {token_indices.shape[0]}], got {offsets}"
        )
    for slot in range(len(offsets) - 1):
        start, end = offsets[slot], offsets[slot + 1]
        if start >= end:
            continue
        rows = token_indices[start:end]
        delta = _delta(x.index_select(0, rows), lora_a[slot], lora_b[slot], batch_invariant)
        y.index_copy_(0, rows, (y.index_select(0, rows).float() + delta).to(y.dtype))
