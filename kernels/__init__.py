"""Custom kernels for sansllm: triton on CUDA; on the CPU, C++ kernels (`kernels.cpu_ops`) where torch ops
cannot be made fast, and the torch path (the reference for both) for the rest.

Every public function here dispatches (see `kernels.dispatch`): `kernels.torch_ops.<module>` holds the
torch implementations and `kernels.triton_ops.<module>` the triton ones, each with the same signature.
`set_batch_invariant(True)` (or `with batch_invariant():`) swaps in matmul, attention and norm paths whose
result for a row does not depend on the rest of the batch.
"""

from kernels.dispatch import get_backend, set_backend, use_backend
from kernels.kv_cache import allocate_kv_cache, slot_mapping
from kernels.mode import batch_invariant, is_batch_invariant, set_batch_invariant
from kernels.ops import (
    apply_penalties,
    apply_sampling_masks,
    apply_token_penalties,
    gelu_tanh_and_mul,
    linear,
    lora_add,
    pack_linear_weight,
    paged_attention,
    prepare,
    reshape_and_cache,
    rms_norm,
    rotary_embedding,
    sample,
    silu_and_mul,
)
from kernels.quantized import quant_linear
from kernels.rope import compute_cos_sin_cache, rope_type

__all__ = [
    "allocate_kv_cache",
    "apply_penalties",
    "apply_sampling_masks",
    "apply_token_penalties",
    "batch_invariant",
    "compute_cos_sin_cache",
    "gelu_tanh_and_mul",
    "get_backend",
    "is_batch_invariant",
    "linear",
    "lora_add",
    "pack_linear_weight",
    "paged_attention",
    "prepare",
    "quant_linear",
    "reshape_and_cache",
    "rms_norm",
    "rope_type",
    "rotary_embedding",
    "sample",
    "set_backend",
    "set_batch_invariant",
    "silu_and_mul",
    "slot_mapping",
    "use_backend",
]
