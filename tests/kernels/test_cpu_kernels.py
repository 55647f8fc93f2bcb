"""The C++ CPU kernels (`kernels.cpu_ops`): they build here, and match the definition like the torch path."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import cpu_ops
from kernels.torch_ops import attention as torch_attention
from tests.kernels.paged import make_paged_batch, naive_attention

HEADS = [(9, 3, 64), (4, 4, 32), (8, 1, 16)]  # SmolLM2's 9/3 GQA with head_dim 64, MHA, MQA


@pytest.fixture(scope="module")
def ops():
    built = cpu_ops.load()
    assert built is not None, f"the C++ CPU kernels did not build: {cpu_ops.unavailable_reason()}"
    return built


def decode_batch(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, **options):
    # lengths 1 .. 70 around block edges, so last blocks are partly filled; NaN in every row no sequence owns
    seq_lens = [1 + (17 * i) % 70 for i in range(num_seqs)]
    options.setdefault("unused_fill", float("nan"))
    return make_paged_batch([1] * num_seqs, seq_lens, num_heads, num_kv_heads, head_dim, **options)


def decode(ops, batch):
    return ops.paged_decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens, batch.scale
    )


# 1-3 sequences: one task per (sequence, kv head); 40: one task per sequence with all its kv heads
@pytest.mark.parametrize("num_seqs", [1, 3, 40])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), HEADS)
@pytest.mark.parametrize("block_size", [16, 4])
def test_decode_kernel_matches_the_definition(ops, num_seqs, num_heads, num_kv_heads, head_dim, block_size):
    batch = decode_batch(num_seqs, num_heads, num_kv_heads, head_dim, block_size=block_size)
    out = decode(ops, batch)
    assert not out.isnan().any(), "read a cache row past a sequence's end"
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# head_dim 64 and 128 take the AVX-512 paths where the CPU has them, 32 the portable one
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (4, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("num_seqs", [2, 40])
def test_decode_kernel_in_16_bit_stays_close_to_the_definition(
    ops, dtype, num_heads, num_kv_heads, head_dim, num_seqs
):
    batch = decode_batch(num_seqs, num_heads, num_kv_heads, head_dim, dtype=dtype)
    out = decode(ops, batch)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=2e-2, rtol=2e-2)


def test_decode_kernel_refuses_mismatched_inputs(ops):
    batch = decode_batch(3, 9, 3, 64)
    with pytest.raises(RuntimeError, match="int32"):
        ops.paged_decode_attention(
            batch.query, batch.key_cache, batch.value_cache, batch.block_tables.long(), batch.seq_lens, 1.0
        )
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        ops.paged_decode_attention(
            batch.query[:, :8].contiguous(),
            batch.key_cache,
            batch.value_cache,
            batch.block_tables,
            batch.seq_lens,
            1.0,
        )


def test_cpu_dispatch_uses_the_kernel_for_decode_rows_of_mixed_batches(ops):
    # decode rows read NaN-free results only if the C++ kernel (which never reads past the end) took them
    batch = make_paged_batch([1, 9, 1, 3], [33, 9, 2, 20], 9, 3, 64, unused_fill=float("nan"))
    with kernels.use_backend("cpp"):
        out = kernels.paged_attention(*batch.attention_args())
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)
    with kernels.use_backend("torch"):
        reference = torch_attention.paged_attention(
            *batch.attention_args(batch.key_cache.nan_to_num(0.0), batch.value_cache.nan_to_num(0.0))
        )
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    sequences=st.lists(
        st.tuples(st.integers(1, 40), st.integers(0, 40)),  # (new tokens, cached context)
        min_size=1,
        max_size=8,
    ),
    group=st.sampled_from([1, 3]),
    block_size=st.sampled_from([4, 16]),
)
def test_cpu_path_matches_the_definition_on_any_ragged_batch(ops, sequences, group, block_size):
    q_lens = [q_len for q_len, _ in sequences]
    seq_lens = [q_len + context for q_len, context in sequences]
    batch = make_paged_batch(q_lens, seq_lens, 2 * group, 2, 8, block_size=block_size)
    with kernels.use_backend("cpp"):
        out = kernels.paged_attention(*batch.attention_args())
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)


# ---- the per-layer ops: the C++ kernel against its torch reference, through the public dispatch ----

DTYPES = [torch.float32, torch.bfloat16]


def _both(fn):
    """fn() under the C++ CPU kernels and under the torch references."""
    with kernels.use_backend("cpp"):
        fast = fn()
    with kernels.use_backend("torch"):
        reference = fn()
    return fast, reference


def _exact_in_16_bit(dtype: torch.dtype) -> dict:
    # bfloat16 results round identically (the kernels keep torch's rounding steps); float32 differs
    # only by summation order and fused multiply-adds
    return {"atol": 0, "rtol": 0} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_torch_path(ops, dtype, rows, with_residual):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=generator).to(dtype)
    residual = torch.randn(rows, 576, generator=generator).to(dtype) if with_residual else None
    weight = torch.randn(576, generator=generator).to(dtype)
    fast, reference = _both(lambda: kernels.rms_norm(x, weight, 1e-5, residual))
    if with_residual:
        torch.testing.assert_close(fast[0], reference[0], **_exact_in_16_bit(dtype))
        assert torch.equal(fast[1], reference[1])  # the new residual: x + residual in x's dtype
    else:
        torch.testing.assert_close(fast, reference, **_exact_in_16_bit(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [64, 32])  # whole heads, and partial rotary (the rest passes through)
def test_rotary_embedding_on_slices_of_one_qkv_matmul(ops, dtype, is_neox, rot_dim):
    generator = torch.Generator().manual_seed(rot_dim)
    qkv = torch.randn(7, 9 * 64 + 2 * 3 * 64, generator=generator).to(dtype)
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)  # row-strided views
    positions = torch.tensor([0, 1, 2, 30, 31, 500, 4000])
    table = kernels.compute_cos_sin_cache(rot_dim, 4096 + 1, 10000.0)
    fast, reference = _both(lambda: kernels.rotary_embedding(positions, q, k, table, 64, is_neox))
    for got, expected in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, expected, **_exact_in_16_bit(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 33])
def test_silu_and_mul_matches_the_torch_path(ops, dtype, rows):
    x = torch.randn(rows, 2 * 1536, generator=torch.Generator().manual_seed(rows)).to(dtype) * 4
    fast, reference = _both(lambda: kernels.silu_and_mul(x))
    # exp comes from different vector math libraries: silu may land one bfloat16 step apart, which the product rounds again
    tolerance = {"atol": 0, "rtol": 2**-6} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(fast, reference, **tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_write_skips_padding_slots_and_takes_strided_rows(ops, dtype):
    generator = torch.Generator().manual_seed(0)
    kv = torch.randn(5, 2 * 2 * 8, generator=generator).to(dtype)
    key, value = (half.view(5, 2, 8) for half in kv.split([16, 16], dim=-1))  # row-strided views
    slots = torch.tensor([3, -1, 0, 17, 9], dtype=torch.int32)

    def write():
        caches = kernels.allocate_kv_cache(5, 4, 2, 8, dtype)
        kernels.reshape_and_cache(key, value, *caches, slots)
        return caches

    fast, reference = _both(write)
    for got, expected in zip(fast, reference, strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(fast[0].view(-1, 2, 8)[17], key[3])
    assert not fast[0].view(-1, 2, 8)[[1, 2, 4]].any()  # slots nobody wrote stay zero


def test_cache_write_refuses_a_slot_outside_the_cache(ops):
    key = torch.randn(1, 2, 8)
    caches = kernels.allocate_kv_cache(2, 4, 2, 8)
    with kernels.use_backend("cpp"), pytest.raises(RuntimeError, match="outside the cache"):
        kernels.reshape_and_cache(key, key, *caches, torch.tensor([8], dtype=torch.int32))


# ---- without the C++ kernels: switched off, or no compiler ----


def test_switched_off_kernels_leave_the_torch_path(monkeypatch):
    batch = make_paged_batch([1, 1, 3], [5, 40, 3], 9, 3, 64)
    monkeypatch.setattr(cpu_ops, "_enabled", False)  # what SANSLLM_CPU_KERNELS=0 sets at import
    assert cpu_ops.load() is None
    assert cpu_ops.unavailable_reason() == "disabled by SANSLLM_CPU_KERNELS"
    out = kernels.paged_attention(*batch.attention_args())
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)


def test_a_failed_build_is_reported_once_and_falls_back(monkeypatch, caplog):
    calls = []

    def no_compiler() -> None:
        calls.append(1)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpu_ops, "_state", {})
    monkeypatch.setattr(cpu_ops, "_build", no_compiler)
    with caplog.at_level("WARNING", logger="kernels.cpu_ops"):
        assert cpu_ops.load() is None
        assert cpu_ops.load() is None
    assert calls == [1]
    assert "no C++ compiler found" in cpu_ops.unavailable_reason()
    assert any("using the torch path" in record.getMessage() for record in caplog.records)
    x = torch.randn(4, 32)
    torch.testing.assert_close(
        kernels.rms_norm(x, torch.ones(32), 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    )


def test_the_environment_switch_is_read_at_import():
    script = "from kernels import cpu_ops; print(cpu_ops.load() is None, cpu_ops.unavailable_reason())"
    env = {**os.environ, "SANSLLM_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True disabled by SANSLLM_CPU_KERNELS"


def test_a_build_killed_halfway_does_not_hang_later_starts(ops, tmp_path):
    """torch's build lock is a plain file that a killed build leaves behind; a later start must not wait
    on it forever (it would, in torch's own loader, with no timeout)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    script = "from kernels import cpu_ops; print(cpu_ops.build_directory())"
    target = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    directory = Path(target.stdout.strip())
    shutil.copytree(cpu_ops.build_directory(), directory)  # this machine's build, so nothing recompiles
    (directory / "lock").write_text("")  # what a build killed halfway leaves
    script = "from kernels import cpu_ops; print(cpu_ops.load() is not None, cpu_ops.unavailable_reason())"
    loaded = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, timeout=300
    )
    assert loaded.stdout.strip() == "True None"
    assert not (directory / "lock").exists()


def test_rotary_refuses_a_position_past_its_table(ops):
    q, k = torch.randn(2, 64), torch.randn(2, 64)
    table = kernels.compute_cos_sin_cache(64, 16, 10000.0)
    with kernels.use_backend("cpp"), pytest.raises(RuntimeError, match="outside the rotary table"):
        kernels.rotary_embedding(torch.tensor([3, 16]), q, k, table, 64)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the -march values below name x86-64 CPUs")
@pytest.mark.parametrize("march", ["skylake-avx512"])  # AVX-512 without BF16
def test_sources_compile_for_cpus_without_this_ones_instructions(march):
    """The build uses -march=native, so this machine only ever compiles its own fast paths; the
    portable ones must compile too. The AVX2 and plain x86-64 builds are compiled (code generated,
    not only checked) by tests/kernels/test_cpu_targets.py; this adds AVX-512 without BF16."""
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]]
    for source in cpu_ops._SOURCES:
        command = [
            "g++",
            "-std=c++17",
            "-fsyntax-only",
            f"-march={march}",
            "-fopenmp",
            "-ffast-math",
            *includes,
        ]
        result = subprocess.run([*command, str(source)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]


def test_the_build_folder_is_keyed_by_the_sources_and_flags(monkeypatch):
    """Two installs with different kernel sources must not share (and rebuild) one folder."""
    first = cpu_ops.build_directory()
    assert first == cpu_ops.build_directory() and first.name.startswith("sansllm_cpu_kernels-")
    monkeypatch.setattr(cpu_ops, "_CFLAGS", (*cpu_ops._CFLAGS, "-DSANSLLM_TEST_FLAG"))
    assert cpu_ops.build_directory() != first
