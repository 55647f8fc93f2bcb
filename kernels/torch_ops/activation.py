"""SiLU-and-mul, the gated activation of Llama-family MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2*d] -> [..., d]: `silu(x[..., :d]) * x[..., d:]` (gate first, then up, as vLLM packs them)."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]).mul_(x[..., d:])
