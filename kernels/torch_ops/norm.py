"""RMSNorm with an optional fused residual add (vLLM's `fused_add_rms_norm` semantics)."""

from __future__ import annotations

import torch


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    # The sum is rounded to the activation dtype, as HF's `residual + hidden_states` does.
    return x if residual is None else x + residual


def _finish(
    hidden: torch.Tensor, inv_rms: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    # Normalise in float32, round to the activation dtype, then scale: the order HF and vLLM use.
    normed = (hidden.float() * inv_rms).to(hidden.dtype)
    out = normed.mul_(weight) if weight.dtype == hidden.dtype else (normed * weight).to(hidden.dtype)
    return out if residual is None else (out, hidden)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last dim, statistics in float32.

    With `residual`: `new_residual = x + residual` and the norm of `new_residual` is returned as
    `(out, new_residual)`, the pair a pre-norm decoder layer threads through.
    """
    hidden = _add_residual(x, residual)
    inv_rms = torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True).add_(eps))
    return _finish(hidden, inv_rms, weight, residual)


def _fixed_order_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by pairwise halving: the same additions in the same order for every row.

    torch's own reductions may split a long row across threads when the batch is small, which makes a
    row's sum depend on the batch size; elementwise adds of fixed halves cannot.
    """
    width = values.shape[-1]
    padded = 1 << max(width - 1, 0).bit_length()
    if padded != width:
        values = torch.nn.functional.pad(values, (0, padded - width))
    while values.shape[-1] > 1:
        half = values.shape[-1] // 2
        values = values[..., :half] + values[..., half:]
    return values


def rms_norm_batch_invariant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm` with a reduction order that depends only on the row, never on the batch."""
    hidden = _add_residual(x, residual)
    squares = hidden.float().square()
    mean = _fixed_order_sum(squares).div_(hidden.shape[-1])
    inv_rms = torch.rsqrt(mean.add_(eps))
    return _finish(hidden, inv_rms, weight, residual)
