"""Rotary position embeddings, HF style (rotate-half), with the common scaling schemes.

Frequencies are computed the way transformers computes them so our logits match its models; the
rotation itself is `kernels.rotary_embedding`, reading the table `cos_sin_cache` builds. We
build the table here rather than with `kernels.compute_cos_sin_cache` because GGUF frequency
factors and `dynamic` scaling need their own frequencies.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.model_config import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def inverse_frequencies(
    head_dim: int,
    base: float,
    scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 2048,
    freq_factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """`inv_freq` (head_dim // 2 floats) for a rope type in an HF `rope_scaling` dict.

    `freq_factors` are llama.cpp's `rope_freqs.weight` (Llama 3.1 GGUFs bake their llama3 scaling
    into it): the frequencies are divided by them.
    `dynamic` follows vLLM's static form (the base scaled for `factor x max_position_embeddings`),
    not transformers' per-length recomputation, which would give each sequence its own table.
    """
    scaling = dict(scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    factor = float(scaling.get("factor", 1.0))
    if rope_type == "dynamic":
        base = base * (factor * factor - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / factor
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, factor, scaling, max_position_embeddings)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.to(torch.float)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, factor: float, scaling: dict[str, Any], max_pos: int) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling, as transformers' `_compute_llama3_parameters`."""
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", max_pos)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(
    inv_freq: torch.Tensor, max_position: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[max_position, head_dim] table in the layout `kernels.rotary_embedding` reads: cos | sin."""
    freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
