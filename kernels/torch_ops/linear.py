"""The model's dense projection, `x @ weight.T + bias`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per matmul in batch-invariant mode. BLAS picks its kernel (gemv for one row, various gemm
# blockings) from the row count, so a row's result changes with the batch size; padding the rows to
# fixed-size tiles and running every tile as the same batched gemm gives each row one reduction order.
BATCH_INVARIANT_TILE_ROWS = 8


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in_features], weight: [out_features, in_features] -> [..., out_features]."""
    return F.linear(x, weight, bias)


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
