"""Compile every triton kernel ahead of time for real NVIDIA targets, no GPU needed.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but accepts things the compiler
rejects (tile shapes tl.dot cannot take, loop-carried values changing type, ...). Triton's compiler runs
on any machine, down to PTX and cubin, so this catches those too. Run as a script in a process without
TRITON_INTERPRET (the test does); prints one line per compiled kernel and exits non-zero on failure.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.triton_ops import (  # noqa: E402
    activation,
    attention,
    cache,
    linear,
    lora,
    norm,
    penalties,
    rotary,
    sampling,
)


def _signature(kernel, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    names = kernel.arg_names
    missing = set(names) - set(types) - set(constexprs)
    if missing:
        raise KeyError(f"{kernel.fn.__name__}: no type for {sorted(missing)}")
    return {name: ("constexpr" if name in constexprs else types[name]) for name in names}


def _cases(dtype: str):
    """(kernel, argument types, constexpr values) for one activation dtype."""
    p, i, f = f"*{dtype}", "i32", "fp32"
    dot_precision = "ieee" if dtype == "fp32" else "tf32"
    for has_residual in (False, True):
        yield norm.rms_norm_kernel, dict.fromkeys(
            ["x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr"], p
        ) | dict.fromkeys(
            ["x_row_stride", "residual_row_stride", "out_row_stride", "residual_out_row_stride", "hidden"], i
        ) | {"eps": f}, {"HAS_RESIDUAL": has_residual, "BLOCK": 1024}
    yield activation.silu_and_mul_kernel, {
        "x_ptr": p, "out_ptr": p, "x_row_stride": i, "out_row_stride": i, "d": i,
    }, {"BLOCK": 1024}
    for is_neox in (True, False):
        yield rotary.rotary_kernel, {
            "positions_ptr": "*i64", "x_ptr": p, "cos_sin_ptr": "*fp32", "token_stride": i,
            "cos_sin_stride": i, "num_heads": i, "head_dim": i, "half_rot": i,
        }, {"IS_NEOX": is_neox, "HEADS_BLOCK": 16, "HALF_BLOCK": 32}
    yield cache.reshape_and_cache_kernel, dict.fromkeys(
        ["key_ptr", "value_ptr", "key_cache_ptr", "value_cache_ptr"], p
    ) | {"slot_mapping_ptr": "*i64"} | dict.fromkeys(
        ["key_token_stride", "value_token_stride", "key_slot_stride", "value_slot_stride", "token_width"], i
    ), {"BLOCK": 256}
    for max_query_len in (1, 7):
        block_q, group_block = attention.tile_tokens(max_query_len, queries_per_kv=3, batch_invariant=False)
        yield attention.paged_attention_kernel, dict.fromkeys(
            ["out_ptr", "query_ptr", "key_cache_ptr", "value_cache_ptr"], p
        ) | dict.fromkeys(["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"], "*i32") | {
            "scale_log2": f
        } | dict.fromkeys(
            [
                "queries_per_kv", "head_dim", "query_token_stride", "query_head_stride", "out_token_stride",
                "out_head_stride", "key_block_stride", "key_slot_stride", "key_head_stride",
                "value_block_stride", "value_slot_stride", "value_head_stride", "block_table_stride",
                "tiles_per_seq", "sliding_window",
            ],
            i,
        ), {
            "BLOCK_SIZE": 16, "BLOCK_Q": block_q, "GROUP_BLOCK": group_block, "HEAD_BLOCK": 64,
            "DOT_PRECISION": dot_precision, "DOT_UPCAST": False,
            "WINDOWED": max_query_len > 1,  # both kinds compiled, one with each tile shape
        }
    for has_bias in (False, True):
        yield linear.linear_kernel, dict.fromkeys(["x_ptr", "weight_ptr", "bias_ptr", "out_ptr"], p) | dict.fromkeys(
            ["rows", "out_features", "in_features", "x_row_stride", "weight_row_stride", "out_row_stride"], i
        ), {
            "HAS_BIAS": has_bias, "BLOCK_M": linear.BLOCK_M, "BLOCK_N": linear.BLOCK_N,
            "BLOCK_K": linear.BLOCK_K, "DOT_PRECISION": dot_precision, "DOT_UPCAST": False,
        }
    lora_slots = {"indices_ptr": "*i64", "offsets_ptr": "*i64", "block_starts_ptr": "*i32", "num_slots": i, "rank": i}
    for block_r in (16, 64):  # ranks up to 16, and 48-64 (stacked q/k/v adapters)
        yield lora.lora_shrink_kernel, {"x_ptr": p, "a_ptr": p, "v_ptr": "*fp32"} | lora_slots | dict.fromkeys(
            ["in_features", "x_row_stride", "a_slot_stride", "a_row_stride"], i
        ), {
            "BLOCK_M": lora.BLOCK_M, "BLOCK_R": block_r, "BLOCK_K": lora.BLOCK_K,
            "DOT_PRECISION": dot_precision, "DOT_UPCAST": False,
        }
    yield lora.lora_expand_kernel, {"y_ptr": p, "v_ptr": "*fp32", "b_ptr": p} | lora_slots | dict.fromkeys(
        ["out_features", "y_row_stride", "b_slot_stride", "b_row_stride"], i
    ), {"BLOCK_M": lora.BLOCK_M, "BLOCK_N": lora.BLOCK_N, "BLOCK_R": 16, "DOT_PRECISION": dot_precision}
    if dtype == "fp32":  # logits are float32 whatever the model dtype
        yield sampling.sampling_mask_kernel, {
            "logits_ptr": "*fp32", "out_ptr": "*fp32", "temperature_ptr": "*fp32", "top_k_ptr": "*i32",
            "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "vocab": i, "logits_row_stride": i,
            "out_row_stride": i, "greedy_temperature": f,
        }, {"BLOCK": 4096}
        yield penalties.token_penalties_kernel, {
            "logits_ptr": "*fp32", "token_ids_ptr": "*i64", "counts_ptr": "*i32",
            "repetition_ptr": "*fp32", "frequency_ptr": "*fp32", "presence_ptr": "*fp32", "vocab": i,
            "width": i, "logits_row_stride": i, "token_ids_row_stride": i, "counts_row_stride": i,
        }, {"BLOCK": 1024}


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    for dtype in ("fp32", "bf16"):
        for kernel, types, constexprs in _cases(dtype):
            source = ASTSource(fn=kernel, signature=_signature(kernel, types, constexprs), constexprs=constexprs)
            compiled = triton.compile(source, target=target)
            assert compiled.asm.get("cubin"), f"{kernel.fn.__name__}: no cubin"
            print(f"sm_{arch} {dtype} {kernel.fn.__name__} {sorted(constexprs.items())}: ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
