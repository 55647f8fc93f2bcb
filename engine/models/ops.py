"""The kernels the model calls, in one place: the kernels package picks triton on CUDA and its torch
path elsewhere (and batch-invariant variants when that mode is on)."""

from __future__ import annotations

from kernels import gelu_tanh_and_mul, linear, pack_linear_weight, rms_norm, rotary_embedding, silu_and_mul

__all__ = ["gelu_tanh_and_mul", "linear", "pack_linear_weight", "rms_norm", "rotary_embedding", "silu_and_mul"]
