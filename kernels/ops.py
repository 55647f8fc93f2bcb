"""The kernels the engine calls: each picks the triton kernel on CUDA tensors; on the CPU the C++ kernel
where there is one and it built (`kernels.cpu_ops`), else the torch path; and the batch-invariant
variant when that mode is on (see `kernels.mode`)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from kernels import cpu_ops
from kernels.cpu_ops import attention as cpu_attention
from kernels.dispatch import get_backend, use_cpp, use_triton
from kernels.mode import is_batch_invariant
from kernels.torch_ops import activation, attention, cache, norm, penalties, rotary, sampling
from kernels.torch_ops import linear as torch_linear


def _triton(module: str) -> ModuleType:
    """A `kernels.triton_ops` module, imported on first use so CPU-only processes never load triton."""
    return importlib.import_module(f"kernels.triton_ops.{module}")


def _cpp(tensor: torch.Tensor) -> Any | None:
    """The built C++ CPU kernels when they should take a call on `tensor`, in either mode.

    Batch-invariant mode may use them: each computes a row (a token's norm, rotation, activation, a
    decode row's attention) by itself in a fixed order, so a row's result never depends on the batch
    (`tests/kernels/test_batch_invariance.py` checks it bitwise on both paths).
    """
    if not use_cpp(tensor):
        return None
    return cpu_ops.load()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, returns `(rmsnorm(x + residual), x + residual)`."""
    if use_triton(x):
        return _triton("norm").rms_norm(x, weight, eps, residual)
    if (built := _cpp(x)) is not None and x.dim() == 2 and weight.dtype == x.dtype:
        out, hidden = built.rms_norm(x, residual, weight, eps)
        return out if residual is None else (out, hidden)
    if is_batch_invariant():
        return norm.rms_norm_batch_invariant(x, weight, eps, residual)
    return norm.rms_norm(x, weight, eps, residual)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q, k)` [num_tokens, heads*head_dim] rotated by `positions`; cache from `kernels.compute_cos_sin_cache`."""
    if use_triton(q):
        return _triton("rotary").rotary_embedding(positions, q, k, cos_sin_cache, head_dim, is_neox)
    if (
        (built := _cpp(q)) is not None
        and q.dim() == 2
        and cos_sin_cache.dtype == torch.float32
        and positions.dtype == torch.int64
    ):
        return built.rotary_embedding(positions.reshape(-1), q, k, cos_sin_cache, head_dim, is_neox)
    return rotary.rotary_embedding(positions, q, k, cos_sin_cache, head_dim, is_neox)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2*d] -> [..., d]: silu(gate) * up."""
    if use_triton(x):
        return _triton("activation").silu_and_mul(x)
    if (built := _cpp(x)) is not None and x.dim() == 2:
        return built.silu_and_mul(x)
    return activation.silu_and_mul(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2*d] -> [..., d]: gelu(gate, tanh approximation) * up (Gemma's MLP). On the CPU the torch
    path (gelu, then an in-place product) serves: there is no C++ kernel for it yet."""
    if use_triton(x):
        return _triton("activation").gelu_tanh_and_mul(x)
    return activation.gelu_tanh_and_mul(x)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ weight.T + bias`; batch-invariant mode swaps in a fixed-tile matmul.

    `packed`, from `pack_linear_weight(weight)`, is the CPU's faster layout of the same weight; the
    batch-invariant paths need `weight` itself.
    """
    if is_batch_invariant():
        if weight.numel() == 0 and packed is not None:
            raise RuntimeError(
                "this model's weights were packed for the default mode; batch-invariant mode needs "
                "them unpacked (turn it on before the model is loaded)"
            )
        if use_triton(x):
            return _triton("linear").linear(x, weight, bias)
        return torch_linear.linear_batch_invariant(x, weight, bias)
    if packed is not None:
        return torch_linear.linear_packed(x, packed, bias)
    return torch_linear.linear(x, weight, bias)


def prepare(device: torch.device | str) -> None:
    """Build whatever kernels `device` will use now (the C++ CPU kernels compile on first use), so the
    first request does not wait for a compiler."""
    if torch.device(device).type == "cpu" and get_backend() in ("auto", "cpp"):
        cpu_ops.load()


def pack_linear_weight(weight: torch.Tensor, *, float32: bool = False) -> torch.Tensor | None:
    """A faster layout of a `linear` weight for this device, or None where plain `weight` is best.

    `float32=True` packs float32 weights too (a win for many rows a call, as encoders run)."""
    if use_triton(weight) or is_batch_invariant():
        return None
    return torch_linear.pack_weight(weight, float32=float32)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] at flat `slot_mapping` slots (-1: skip)."""
    if use_triton(key_cache):
        _triton("cache").reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    elif (built := _cpp(key_cache)) is not None and key.dtype == value.dtype == key_cache.dtype:
        rows = key.shape[0]
        built.reshape_and_cache(
            key.reshape(rows, -1), value.reshape(rows, -1), key_cache, value_cache, slot_mapping.reshape(-1)
        )
    else:
        cache.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal varlen attention over the paged cache (prefill, chunked prefill, decode; GQA); with
    `sliding_window` W each token sees only the last W positions up to its own (None: all)."""
    args = (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len, max_seq_len)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1 (or None), got {sliding_window}")
    window = {"sliding_window": sliding_window}
    if use_triton(query):
        return _triton("attention").paged_attention(*args, batch_invariant=is_batch_invariant(), **window)
    built = _cpp(query)
    if is_batch_invariant():
        decode = None if built is None else cpu_attention.decode_rows(built)
        return attention.paged_attention_batch_invariant(*args, decode=decode, **window)
    if built is not None:
        return cpu_attention.paged_attention(built, *args, **window)
    return attention.paged_attention(*args, **window)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token id per row of logits [B, V]; temperature 0 is greedy, `generators[i]` seeds row i."""
    if use_triton(logits):
        return _triton("sampling").sample(logits, temperature, top_k, top_p, min_p, generators)
    return sampling.sample(logits, temperature, top_k, top_p, min_p, generators)


def apply_sampling_masks(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Temperature-scaled logits with the tokens min-p / top-k / top-p drop set to -inf (for logprobs too)."""
    if use_triton(logits):
        return _triton("sampling").apply_sampling_masks(logits, temperature, top_k, top_p, min_p)
    return sampling.apply_sampling_masks(logits, temperature, top_k, top_p, min_p)


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor,
    output_token_ids: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """Repetition (prompt + output tokens), frequency and presence (output tokens) penalties, in place.

    Token-id tensors are [B, N] padded with any id outside [0, V).
    """
    args = (logits, prompt_token_ids, output_token_ids, repetition_penalties, frequency_penalties, presence_penalties)
    if use_triton(logits):
        return _triton("penalties").apply_penalties(*args)
    return penalties.apply_penalties(*args)


def apply_token_penalties(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
) -> torch.Tensor:
    """The same penalties, in place, from each row's seen tokens: distinct ids [B, K] (padded with ids
    outside [0, V)) and their output counts [B, K]; the form a logits processor keeps incrementally."""
    args = (logits, token_ids, output_counts, repetition_penalties, frequency_penalties, presence_penalties)
    if use_triton(logits):
        return _triton("penalties").apply_token_penalties(*args)
    return penalties.apply_token_penalties(*args)
