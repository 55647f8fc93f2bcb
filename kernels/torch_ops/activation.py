"""The gated activations of decoder MLPs: SiLU-and-mul (Llama family), GELU(tanh)-and-mul (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2*d] -> [..., d]: `silu(x[..., :d]) * x[..., d:]` (gate first, then up, as vLLM packs them)."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]).mul_(x[..., d:])


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2*d] -> [..., d]: `gelu(x[..., :d], approximate="tanh") * x[..., d:]` (Gemma's MLP)."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh").mul_(x[..., d:])
