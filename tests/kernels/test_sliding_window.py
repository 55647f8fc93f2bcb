"""Sliding-window paged attention (Gemma 3's local layers): every path against the dense definition.

A token at position p sees key positions k with p - W < k <= p. The batches mix prefills, chunks after
cached context and decode rows, with windows below, at and above block and sequence sizes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import cpu_ops
from kernels.torch_ops import attention as torch_attention
from kernels.triton_ops import attention as triton_attention
from tests.kernels.paged import make_paged_batch, naive_attention

# (q_lens, seq_lens)
BATCHES = {
    "prefill": ([23, 5, 40], [23, 5, 40]),
    "decode": ([1, 1, 1, 1], [1, 16, 17, 70]),
    "chunked": ([7, 16], [30, 16 + 16]),
    "mixed": ([1, 9, 1, 30], [33, 9, 2, 50]),
}
WINDOWS = [1, 5, 16, 21, 512]


def close(out: torch.Tensor, batch, window: int | None) -> None:
    assert not out.isnan().any(), "read a cache row outside the window or past a sequence's end"
    torch.testing.assert_close(out.double(), naive_attention(batch, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("batch_name", list(BATCHES))
def test_torch_path(batch_name, window):
    batch = make_paged_batch(*BATCHES[batch_name], 4, 2, 16)
    close(torch_attention.paged_attention(*batch.attention_args(), sliding_window=window), batch, window)


@pytest.mark.parametrize("window", [1, 5, 21])
@pytest.mark.parametrize("batch_name", list(BATCHES))
def test_batch_invariant_torch_path(batch_name, window):
    batch = make_paged_batch(*BATCHES[batch_name], 4, 2, 16)
    out = torch_attention.paged_attention_batch_invariant(*batch.attention_args(), sliding_window=window)
    close(out, batch, window)


def test_the_window_changes_the_result():
    batch = make_paged_batch(*BATCHES["mixed"], 4, 2, 16)
    full = torch_attention.paged_attention(*batch.attention_args())
    windowed = torch_attention.paged_attention(*batch.attention_args(), sliding_window=5)
    assert not torch.allclose(full, windowed)
    # a window at least as long as every sequence is no window at all
    wide = torch_attention.paged_attention(*batch.attention_args(), sliding_window=50)
    torch.testing.assert_close(wide, full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [1, 5, 16, 21])
@pytest.mark.parametrize("batch_name", list(BATCHES))
def test_triton_kernel(batch_name, window):
    # NaN outside every sequence: the kernel must not read past a sequence's end
    batch = make_paged_batch(*BATCHES[batch_name], 8, 2, 32, unused_fill=float("nan"))
    close(triton_attention.paged_attention(*batch.attention_args(), sliding_window=window), batch, window)


def test_triton_kernel_in_bfloat16_with_gemma_heads():
    # Gemma 3 270M: 4 query heads over one kv head of 256
    batch = make_paged_batch(*BATCHES["mixed"], 4, 1, 256, dtype=torch.bfloat16)
    out = triton_attention.paged_attention(*batch.attention_args(), sliding_window=7)
    torch.testing.assert_close(out.double(), naive_attention(batch, 7), atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def ops():
    built = cpu_ops.load()
    assert built is not None, f"the C++ CPU kernels did not build: {cpu_ops.unavailable_reason()}"
    return built


@pytest.mark.parametrize("window", [1, 3, 16, 17, 100])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 1, 256), (9, 3, 64), (4, 4, 32)])
@pytest.mark.parametrize("num_seqs", [2, 40])
def test_cpp_decode_kernel(ops, window, num_heads, num_kv_heads, head_dim, num_seqs):
    seq_lens = [1 + (17 * i) % 70 for i in range(num_seqs)]
    batch = make_paged_batch(
        [1] * num_seqs, seq_lens, num_heads, num_kv_heads, head_dim, unused_fill=float("nan")
    )
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens, batch.scale)
    close(ops.paged_decode_attention(*args, window), batch, window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpp_decode_kernel_with_gemma_heads(ops, dtype):
    # head_dim 256 takes the AVX-512 weighted sum where the CPU has it
    batch = make_paged_batch([1] * 5, [3, 40, 64, 65, 90], 4, 1, 256, dtype=dtype)
    args = (batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.seq_lens, batch.scale)
    for window in (None, 20):
        out = ops.paged_decode_attention(*args, -1 if window is None else window)
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(
            out.double(), naive_attention(batch, window), atol=tolerance, rtol=tolerance
        )


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_dispatcher_passes_the_window_to_every_backend(backend, batch_invariant):
    batch = make_paged_batch(*BATCHES["mixed"], 4, 2, 16)
    with kernels.use_backend(backend), kernels.batch_invariant(batch_invariant):
        out = kernels.paged_attention(*batch.attention_args(), sliding_window=6)
    close(out, batch, 6)


def test_dispatcher_refuses_an_empty_window():
    batch = make_paged_batch(*BATCHES["decode"], 4, 2, 16)
    with pytest.raises(ValueError, match="sliding_window"):
        kernels.paged_attention(*batch.attention_args(), sliding_window=0)


@settings(max_examples=30, deadline=None)
@given(
    sequences=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 40)), min_size=1, max_size=6),
    window=st.integers(1, 50),
    block_size=st.sampled_from([4, 16]),
    backend=st.sampled_from(["cpp", "torch"]),
)
def test_any_ragged_batch(sequences, window, block_size, backend):
    q_lens = [q_len for q_len, _ in sequences]
    seq_lens = [q_len + context for q_len, context in sequences]
    batch = make_paged_batch(q_lens, seq_lens, 6, 2, 8, block_size=block_size)
    with kernels.use_backend(backend):
        out = kernels.paged_attention(*batch.attention_args(), sliding_window=window)
    close(out, batch, window)
