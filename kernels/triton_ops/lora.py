"""Batched LoRA for CUDA (punica / S-LoRA's grouped shrink-expand): `y[t] = round(y[t] + (x[t] @ A[s].T) @ B[s].T)`
for the rows of each adapter slot, as `kernels.torch_ops.lora` defines it.

Two kernels, each program taking a block of BLOCK_M tokens of one slot: shrink (v = x[rows] @ A[s].T, kept in
float32) and expand (y[rows] += v @ B[s].T for a tile of BLOCK_N outputs, in float32, rounded once).

Why the slot lookup runs on the device: the host never reads `slot_offsets` (a read would wait for the GPU
at every adapted layer). The grid's first axis has cdiv(N, BLOCK_M) + S programs, a bound on the number of
token blocks of all slots together; each program finds its slot in a prefix sum of the slots' block counts
(computed by torch on the device), and those past the last block return at once. A row's result does not
depend on the rows beside it (fixed tiles, no split-K), so batch-invariant mode uses these kernels too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton_ops._dot import dot_precision, dot_upcast

BLOCK_M = 16  # tokens per program (tl.dot's minimum)
BLOCK_N = 64  # outputs per expand program
BLOCK_K = 32  # inputs per shrink step


@triton.jit
def _slot_of_program(block_starts_ptr, num_slots):
    """The slot whose token blocks hold this program (num_slots for a program past the last block)."""
    pid = tl.program_id(0)
    slot = pid * 0  # an int32 scalar from the start: a loop-carried value keeps its type
    for s in range(num_slots):
        slot += (tl.load(block_starts_ptr + s + 1) <= pid).to(tl.int32)
    return slot


@triton.jit
def lora_shrink_kernel(
    x_ptr,
    a_ptr,
    v_ptr,
    indices_ptr,
    offsets_ptr,
    block_starts_ptr,
    num_slots,
    rank,
    in_features,
    x_row_stride,
    a_slot_stride,
    a_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    slot = _slot_of_program(block_starts_ptr, num_slots)
    if slot >= num_slots:
        return
    first = tl.load(offsets_ptr + slot) + (tl.program_id(0) - tl.load(block_starts_ptr + slot)) * BLOCK_M
    pos = first + tl.arange(0, BLOCK_M)
    valid = pos < tl.load(offsets_ptr + slot + 1)
    rows = tl.load(indices_ptr + pos, mask=valid, other=0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_valid = r < rank
    a_base = a_ptr + slot.to(tl.int64) * a_slot_stride
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        k = start + inner
        k_valid = k < in_features
        x = tl.load(
            x_ptr + rows[:, None] * x_row_stride + k[None, :],
            mask=valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        a = tl.load(
            a_base + r.to(tl.int64)[:, None] * a_row_stride + k[None, :],
            mask=r_valid[:, None] & k_valid[None, :],
            other=0.0,
        )
        if DOT_UPCAST:
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)
    tl.store(
        v_ptr + pos.to(tl.int64)[:, None] * rank + r[None, :], acc, mask=valid[:, None] & r_valid[None, :]
    )


@triton.jit
def lora_expand_kernel(
    y_ptr,
    v_ptr,
    b_ptr,
    indices_ptr,
    offsets_ptr,
    block_starts_ptr,
    num_slots,
    rank,
    out_features,
    y_row_stride,
    b_slot_stride,
    b_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    slot = _slot_of_program(block_starts_ptr, num_slots)
    if slot >= num_slots:
        return
    first = tl.load(offsets_ptr + slot) + (tl.program_id(0) - tl.load(block_starts_ptr + slot)) * BLOCK_M
    pos = first + tl.arange(0, BLOCK_M)
    valid = pos < tl.load(offsets_ptr + slot + 1)
    rows = tl.load(indices_ptr + pos, mask=valid, other=0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < out_features
    b_base = b_ptr + slot.to(tl.int64) * b_slot_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, rank, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        r_valid = r < rank
        v = tl.load(
            v_ptr + pos.to(tl.int64)[:, None] * rank + r[None, :],
            mask=valid[:, None] & r_valid[None, :],
            other=0.0,
        )
        b = tl.load(
            b_base + n.to(tl.int64)[:, None] * b_row_stride + r[None, :],
            mask=n_valid[:, None] & r_valid[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(v, tl.trans(b), acc, input_precision=DOT_PRECISION)
    mask = valid[:, None] & n_valid[None, :]
    y_ptrs = y_ptr + rows[:, None] * y_row_stride + n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_indices: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """Same contract as `kernels.torch_ops.lora.lora_add` (y updated in place); slot_offsets are not checked
    (that would read them on the host)."""
    slots, rank, in_features = lora_a.shape
    count, out_features = token_indices.shape[0], y.shape[1]
    if count == 0 or slots == 0 or rank == 0 or out_features == 0:
        return
    x, lora_a, lora_b = _last_dim_contiguous(x), _last_dim_contiguous(lora_a), _last_dim_contiguous(lora_b)
    target = _last_dim_contiguous(y)
    indices = token_indices.contiguous()
    offsets = slot_offsets.contiguous()
    blocks = ((offsets[1:] - offsets[:-1]).clamp_min(0) + BLOCK_M - 1) // BLOCK_M
    block_starts = F.pad(torch.cumsum(blocks, 0).to(torch.int32), (1, 0))
    block_r = max(16, min(64, triton.next_power_of_2(rank)))
    v = torch.empty((count, rank), dtype=torch.float32, device=y.device)
    programs = triton.cdiv(count, BLOCK_M) + slots
    lora_shrink_kernel[(programs, triton.cdiv(rank, block_r))](
        x,
        lora_a,
        v,
        indices,
        offsets,
        block_starts,
        slots,
        rank,
        in_features,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        BLOCK_M=BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_K=BLOCK_K,
        DOT_PRECISION=dot_precision(x.dtype),
        DOT_UPCAST=dot_upcast(x.dtype),
    )
    lora_expand_kernel[(programs, triton.cdiv(out_features, BLOCK_N))](
        target,
        v,
        lora_b,
        indices,
        offsets,
        block_starts,
        slots,
        rank,
        out_features,
        target.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_R=block_r,
        DOT_PRECISION=dot_precision(y.dtype),
    )
    if target is not y:
        y.copy_(target)
