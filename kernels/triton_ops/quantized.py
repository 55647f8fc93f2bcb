"""Dequantize-matmul on GGUF blocks for CUDA: `x @ dequant(qweight).T` without a dense copy of the weight.

Each program owns a tile of x's rows and of output features and walks K in steps of 32 elements: one
block of Q4_0/Q4_1/Q8_0, one sub-block of the K-quants (Q4_K, Q5_K, Q6_K: 256-element super-blocks of
eight). Every step loads the bytes of a [BLOCK_N, 32] weight tile, dequantizes them in registers (the
same float32 arithmetic as `kernels.torch_ops.quantized`) and feeds `tl.dot`. Decode reads ~0.56 (Q4)
to ~1.06 (Q8) bytes per weight instead of 2 (bfloat16): that is the point, as decode is bound by reading
weights. With bfloat16 x the weight tile is rounded to bfloat16 for the dot (tensor cores), as a dense
bfloat16 model's weights are; with float32 x the dot is float32 (ieee).

Tiles: small batches (decode) take 16-row, 32-feature tiles so that many programs share the weight
reads; larger batches 64 x 64, which dequantizes each weight tile once per 64 rows. In batch-invariant
mode the tile is fixed whatever the batch, so a row's reduction order never depends on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.mode import is_batch_invariant
from kernels.torch_ops.quantized import block_shape, type_name
from kernels.triton_ops._dot import dot_precision, dot_upcast

# GGML type ids this kernel takes
Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 8, 12, 13, 14
QTYPES = frozenset({Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K})

BLOCK_K = 32  # one block (Q4_0/Q4_1/Q8_0) or one sub-block (K-quants) per K step
SMALL_BATCH = 16  # rows up to which the decode tiles are used


@triton.jit
def _fp16(w_ptr, offset, valid):
    """The float16 at byte `offset` (any alignment) as float32."""
    lo = tl.load(w_ptr + offset, mask=valid, other=0).to(tl.uint16)
    hi = tl.load(w_ptr + offset + 1, mask=valid, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _bytes(w_ptr, block, offset, valid):
    """[BLOCK_N, k] bytes at `block[:, None] + offset[None, :]`, as int32."""
    return tl.load(w_ptr + block[:, None] + offset[None, :], mask=valid[:, None], other=0).to(tl.int32)


@triton.jit
def _byte(w_ptr, offset, valid):
    return tl.load(w_ptr + offset, mask=valid, other=0).to(tl.int32)


@triton.jit
def _q4_0(w_ptr, block, j, valid):
    """18 bytes: d (f16), 16 bytes of nibbles (elements 0-15 low, 16-31 high); x = d * (q - 8)."""
    q = (_bytes(w_ptr, block, 2 + j % 16, valid) >> ((j // 16) * 4)[None, :]) & 0x0F
    return _fp16(w_ptr, block, valid)[:, None] * (q.to(tl.float32) - 8.0)


@triton.jit
def _q4_1(w_ptr, block, j, valid):
    """20 bytes: d, m (f16), 16 bytes of nibbles; x = d * q + m."""
    q = (_bytes(w_ptr, block, 4 + j % 16, valid) >> ((j // 16) * 4)[None, :]) & 0x0F
    d = _fp16(w_ptr, block, valid)[:, None]
    return d * q.to(tl.float32) + _fp16(w_ptr, block + 2, valid)[:, None]


@triton.jit
def _q8_0(w_ptr, block, j, valid):
    """34 bytes: d (f16), 32 int8; x = q * d."""
    q = (_bytes(w_ptr, block, 2 + j, valid) ^ 0x80) - 0x80  # sign-extend the byte
    return q.to(tl.float32) * _fp16(w_ptr, block, valid)[:, None]


@triton.jit
def _k_scale_min(w_ptr, block, sub, valid):
    """Q4_K/Q5_K: sub-block `sub`'s 6-bit scale and min (float32 [BLOCK_N]) from the 12 bytes at 4.."""
    i = sub % 4
    low = _byte(w_ptr, block + 4 + i, valid)
    mid = _byte(w_ptr, block + 8 + i, valid)
    top = _byte(w_ptr, block + 12 + i, valid)
    scale = tl.where(sub < 4, low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30))
    minimum = tl.where(sub < 4, mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _q4_k(w_ptr, block, sub, j, valid):
    """144 bytes: d, dmin, 12 scale bytes, 128 bytes of nibbles (sub-block 2i low, 2i+1 high of 32i..)."""
    scale, minimum = _k_scale_min(w_ptr, block, sub, valid)
    dl = _fp16(w_ptr, block, valid) * scale
    ml = _fp16(w_ptr, block + 2, valid) * minimum
    q = (_bytes(w_ptr, block, 16 + 32 * (sub // 2) + j, valid) >> (4 * (sub % 2))) & 0x0F
    return dl[:, None] * q.to(tl.float32) - ml[:, None]


@triton.jit
def _q5_k(w_ptr, block, sub, j, valid):
    """176 bytes: Q4_K's header, 32 bytes of fifth bits (bit `sub` of byte j), 128 bytes of nibbles."""
    scale, minimum = _k_scale_min(w_ptr, block, sub, valid)
    dl = _fp16(w_ptr, block, valid) * scale
    ml = _fp16(w_ptr, block + 2, valid) * minimum
    low = (_bytes(w_ptr, block, 48 + 32 * (sub // 2) + j, valid) >> (4 * (sub % 2))) & 0x0F
    high = (_bytes(w_ptr, block, 16 + j, valid) >> sub) & 0x01
    return dl[:, None] * (low | (high << 4)).to(tl.float32) - ml[:, None]


@triton.jit
def _q6_k(w_ptr, block, sub, j, valid):
    """210 bytes: 128 of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16), d (f16) at 208."""
    half = sub // 4
    run = sub % 4
    low = (_bytes(w_ptr, block, 64 * half + 32 * (run % 2) + j, valid) >> (4 * (run // 2))) & 0x0F
    high = (_bytes(w_ptr, block, 128 + 32 * half + j, valid) >> (2 * run)) & 0x03
    scale = (_bytes(w_ptr, block, 192 + 2 * sub + j // 16, valid) ^ 0x80) - 0x80
    dl = _fp16(w_ptr, block + 208, valid)[:, None] * scale.to(tl.float32)
    return dl * ((low | (high << 4)).to(tl.float32) - 32.0)


@triton.jit
def _weight_tile(w_ptr, row_start, step, j, valid, QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """The dequantized weights of K step `step` for the rows at byte offsets `row_start`: [BLOCK_N, 32]."""
    if QTYPE == 2:
        w = _q4_0(w_ptr, row_start + step * BLOCK_BYTES, j, valid)
    elif QTYPE == 3:
        w = _q4_1(w_ptr, row_start + step * BLOCK_BYTES, j, valid)
    elif QTYPE == 8:
        w = _q8_0(w_ptr, row_start + step * BLOCK_BYTES, j, valid)
    elif QTYPE == 12:
        w = _q4_k(w_ptr, row_start + (step // 8) * BLOCK_BYTES, step % 8, j, valid)
    elif QTYPE == 13:
        w = _q5_k(w_ptr, row_start + (step // 8) * BLOCK_BYTES, step % 8, j, valid)
    else:
        w = _q6_k(w_ptr, row_start + (step // 8) * BLOCK_BYTES, step % 8, j, valid)
    return w


@triton.jit
def quant_linear_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    rows,
    out_features,
    in_features,
    x_row_stride,
    w_row_bytes,
    out_row_stride,
    QTYPE: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_K)
    row_valid = row < rows
    col_valid = col < out_features
    row_start = col.to(tl.int64) * w_row_bytes
    x_rows = x_ptr + row.to(tl.int64)[:, None] * x_row_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, in_features // BLOCK_K):
        x = tl.load(x_rows + (step * BLOCK_K + j)[None, :], mask=row_valid[:, None], other=0.0)
        w = _weight_tile(w_ptr, row_start, step, j, col_valid, QTYPE, BLOCK_BYTES).to(x.dtype)
        if DOT_UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    tl.store(
        out_ptr + row.to(tl.int64)[:, None] * out_row_stride + col[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
    )


def tile_sizes(rows: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): decode tiles for small batches and in batch-invariant mode, else larger."""
    if rows <= SMALL_BATCH or is_batch_invariant():
        return 16, 32
    return 64, 64


def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int, out_features: int, in_features: int
) -> torch.Tensor:
    """Same contract as `kernels.torch_ops.quantized.quant_linear`, for the formats in `QTYPES`."""
    qtype = int(qtype)
    if qtype not in QTYPES:
        raise ValueError(f"the triton quantized linear does not take GGML type {type_name(qtype)}")
    elements, block_bytes = block_shape(qtype, in_features)
    w_row_bytes = in_features // elements * block_bytes
    weight = qweight.reshape(-1).contiguous()
    if weight.dtype != torch.uint8 or weight.numel() != out_features * w_row_bytes:
        raise ValueError(
            f"{type_name(qtype)} weight of {out_features}x{in_features} needs "
            f"{out_features * w_row_bytes} bytes (uint8), got {weight.numel()} {weight.dtype}"
        )
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], out_features), dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0 or out_features == 0:
        return out.view(*x.shape[:-1], out_features)
    block_m, block_n = tile_sizes(rows.shape[0])
    grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(out_features, block_n))
    quant_linear_kernel[grid](
        rows,
        weight,
        out,
        rows.shape[0],
        out_features,
        in_features,
        rows.stride(0),
        w_row_bytes,
        out.stride(0),
        QTYPE=qtype,
        BLOCK_BYTES=block_bytes,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK_K,
        DOT_PRECISION=dot_precision(x.dtype),
        DOT_UPCAST=dot_upcast(x.dtype),
    )
    return out.view(*x.shape[:-1], out_features)
