"""The cos/sin cache `rotary_embedding` reads, built as HF transformers builds its rotary tables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def _inverse_frequencies(rotary_dim: int, base: float) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (base**exponents)


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short kept, the band between interpolated."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
    """The scaling kind of an HF `rope_scaling` / `rope_parameters` dict ("default" when absent)."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type") or rope_scaling.get("type") or "default")


def compute_cos_sin_cache(
    rotary_dim: int,
    max_position: int,
    base: float,
    rope_scaling: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[max_position, rotary_dim] table: cos of every (position, frequency) then sin, concatenated.

    `rope_scaling` is the model config's dict: None or rope_type "default", "linear" (`factor`) or
    "llama3" (`factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    Other kinds raise ValueError rather than silently giving wrong positions.
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    inv_freq = _inverse_frequencies(rotary_dim, base)
    kind = rope_type(rope_scaling)
    if kind == "linear":
        inv_freq = inv_freq / rope_scaling["factor"]  # type: ignore[index]
    elif kind == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, rope_scaling)  # type: ignore[arg-type]
    elif kind != "default":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=dtype, device=device)
