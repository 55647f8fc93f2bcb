"""The model's dense projection, `x @ weight.T + bias`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per matmul in batch-invariant mode. BLAS picks its kernel (gemv for one row, various gemm
# blockings) from the row count, so a row's result changes with the batch size; padding the rows to
# fixed-size tiles and running every tile as the same batched gemm gives each row one reduction order.
BATCH_INVARIANT_TILE_ROWS = 8


# The row count oneDNN is told to expect when it picks a packed weight layout; measured on a 2-core
# AVX512-BF16 CPU, the hint made no difference between 1 and 512 rows.
_PACK_ROWS_HINT = 32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in_features], weight: [out_features, in_features] -> [..., out_features]."""
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor, *, float32: bool = False) -> torch.Tensor | None:
    """`weight` reordered once into oneDNN's blocked layout for `linear_packed`; None where that path is absent.

    Why: `F.linear` on 16-bit CPU weights makes oneDNN reorder the whole weight on every call. Packing
    once measured 27% less time for the 121 projections of a SmolLM2-135M decode step at 32 rows
    (40.3 -> 29.4 ms) and at 1 row (20.1 -> 14.7 ms), bfloat16 on 2 cores. float32 goes through MKL's
    sgemm, which gained nothing from packing on decode rows, so it is packed only when asked
    (`float32=True`): encoders run a thousand rows at a time, where oneDNN's packed sgemm beat MKL by
    ~10% (all-MiniLM-L6-v2 over 44k tokens: 6.58/6.86/6.76 s -> 6.23/6.07/5.91 s, 2-core AVX-512).
    """
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    supported = {
        torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
        torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
    }
    if float32:
        supported[torch.float32] = lambda: True
    if weight.dtype not in supported or not supported[weight.dtype]():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_ROWS_HINT)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` over a weight from `pack_weight` (same result as `linear` on the unpacked weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_batch_invariant(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`linear` whose result for a row does not depend on how many rows come with it, or where it sits."""
    leading = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    num_rows = rows.shape[0]
    pad = -num_rows % BATCH_INVARIANT_TILE_ROWS
    if pad or not rows.is_contiguous():
        rows = F.pad(rows, (0, 0, 0, pad))
    tiles = rows.view(-1, BATCH_INVARIANT_TILE_ROWS, rows.shape[-1])
    out = torch.matmul(tiles, weight.t()).view(-1, weight.shape[0])[:num_rows]
    if bias is not None:
        out = out + bias
    return out.view(*leading, weight.shape[0])
