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
from kernels.torch_ops import lora as torch_lora


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


# The C++ LoRA kernel's instruction sets, best last; `lora_add(isa=...)` forces one (tests, benchmarks).
LORA_ISAS = ("plain", "avx2", "avx512")
_LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_lora_auto_isa: dict[str, int] = {}  # "isa": the path `lora_add` takes by default, once the kernels are built


def lora_isas() -> tuple[str, ...]:
    """The C++ LoRA paths this CPU can run, best last (empty when the C++ kernels are unavailable)."""
    built = cpu_ops.load()
    return () if built is None else LORA_ISAS[: int(built.lora_isa()) + 1]


def _lora_default_isa(built: Any) -> int:
    """The best path of this CPU, capped as a stand-in CPU would be (SANSLLM_CPU_ISA, see `kernels.cpu_ops`);
    asked of the kernels once (each call through the dispatcher costs microseconds)."""
    isa = _lora_auto_isa.get("isa")
    if isa is None:
        cap = {"avx2": 1, "plain": 0}.get(cpu_ops.target(), len(LORA_ISAS) - 1)
        isa = _lora_auto_isa["isa"] = min(cap, int(built.lora_isa()))
    return isa


def lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_indices: torch.Tensor,
    slot_offsets: torch.Tensor,
    *,
    isa: str | None = None,
) -> None:
    """Add many LoRA adapters' deltas into one batch's base output, in place (punica / S-LoRA):
    `y[t] = round(y[t] + (x[t] @ lora_a[s].T) @ lora_b[s].T)` for each row t of slot s, in float32 with one
    rounding to y's dtype (the definition: `kernels.torch_ops.lora`).

    y [T, out] and x [T, in] in the model's dtype; lora_a [S, R, in], lora_b [S, out, R] (alpha / r folded
    into B, smaller adapters zero-padded to R); token_indices int64 [N], the adapted rows grouped by slot:
    `token_indices[slot_offsets[s]:slot_offsets[s + 1]]` use slot s (slot_offsets int64 [S + 1]). A row
    appears at most once; rows not listed are untouched. Triton on CUDA, the C++ kernel on the CPU (`isa`
    forces one of `LORA_ISAS`), else the torch path. The C++ and triton kernels compute each row in an
    order that does not depend on the batch, so batch-invariant mode keeps them; the torch path switches
    to fixed-tile matmuls there.
    """
    if isa is None and use_triton(y):
        torch_lora.check_lora_args(y, x, lora_a, lora_b, token_indices, slot_offsets)
        _triton("lora").lora_add(y, x, lora_a, lora_b, token_indices, slot_offsets)
        return
    if isa is not None and isa not in LORA_ISAS:
        raise ValueError(f"isa must be one of {LORA_ISAS}, got {isa!r}")
    built = _cpp(y) if isa is None else cpu_ops.load()
    if (
        built is not None
        and y.dtype in _LORA_DTYPES
        and x.dtype == lora_a.dtype == lora_b.dtype == y.dtype
        and x.is_cpu
        and lora_a.is_cpu
        and lora_b.is_cpu
    ):
        path = _lora_default_isa(built) if isa is None else LORA_ISAS.index(isa)
        built.lora_add(y, x, lora_a, lora_b, token_indices, slot_offsets, path)
        return
    if isa is not None:
        raise RuntimeError(
            f"the C++ LoRA path {isa!r} is unavailable: {cpu_ops.unavailable_reason() or 'not a C++ kernel case'}"
        )
    args = (y, x, lora_a, lora_b, token_indices, slot_offsets)
    torch_lora.lora_add(*args, batch_invariant=is_batch_invariant())


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
