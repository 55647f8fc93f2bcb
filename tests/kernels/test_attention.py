"""Paged attention: the torch path and the triton kernel against dense causal attention from the definition."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.torch_ops import attention as torch_attention
from kernels.triton_ops import attention as triton_attention
from tests.kernels.paged import make_paged_batch, naive_attention

# (q_lens, seq_lens): the scheduler's situations, with partially filled last blocks everywhere.
PREFILL = ([5, 17, 1], [5, 17, 1])
DECODE = ([1, 1, 1, 1], [1, 16, 17, 40])
CHUNKED_PREFILL = ([7, 16], [30, 16 + 16])  # new tokens after cached context (prefix caching)
MIXED = ([1, 9, 1, 3], [33, 9, 2, 20])
BATCHES = {"prefill": PREFILL, "decode": DECODE, "chunked": CHUNKED_PREFILL, "mixed": MIXED}
HEADS = [(9, 3, 64), (4, 4, 32), (8, 1, 16)]  # SmolLM2's 9/3 GQA with head_dim 64, MHA, MQA


@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), HEADS)
def test_torch_path_matches_dense_causal_attention(batch_name, num_heads, num_kv_heads, head_dim):
    q_lens, seq_lens = BATCHES[batch_name]
    batch = make_paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim)
    out = torch_attention.paged_attention(*batch.attention_args())
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)


def test_torch_path_handles_block_sizes_other_than_16():
    batch = make_paged_batch([3, 1, 1], [21, 5, 12], 6, 2, 8, block_size=4)
    out = torch_attention.paged_attention(*batch.attention_args())
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_name", ["mixed", "decode"])
def test_torch_path_in_bfloat16_stays_close_to_the_definition(batch_name):
    batch = make_paged_batch(*BATCHES[batch_name], 9, 3, 64, dtype=torch.bfloat16)
    out = torch_attention.paged_attention(*batch.attention_args())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("batch_name", list(BATCHES))
def test_batch_invariant_torch_path_matches_dense_causal_attention(batch_name):
    batch = make_paged_batch(*BATCHES[batch_name], 9, 3, 64)
    out = torch_attention.paged_attention_batch_invariant(*batch.attention_args())
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 16)])
def test_triton_kernel_matches_torch_path(batch_name, num_heads, num_kv_heads, head_dim):
    # Cache rows outside every sequence hold NaN: the kernel must never read past a sequence's end.
    batch = make_paged_batch(*BATCHES[batch_name], num_heads, num_kv_heads, head_dim, unused_fill=float("nan"))
    out = triton_attention.paged_attention(*batch.attention_args())
    expected = torch_attention.paged_attention(
        *batch.attention_args(batch.key_cache.nan_to_num(0.0), batch.value_cache.nan_to_num(0.0))
    )
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)


def test_triton_kernel_in_bfloat16():
    batch = make_paged_batch(*MIXED, 9, 3, 64, dtype=torch.bfloat16)
    out = triton_attention.paged_attention(*batch.attention_args())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=2e-2, rtol=2e-2)


def test_triton_kernel_rejects_block_sizes_its_tiles_cannot_take():
    batch = make_paged_batch([2], [6], 4, 2, 16, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        triton_attention.paged_attention(*batch.attention_args())


def test_dispatcher_runs_either_backend_with_the_same_result():
    batch = make_paged_batch(*MIXED, 9, 3, 64)
    with kernels.use_backend("torch"):
        via_torch = kernels.paged_attention(*batch.attention_args())
    with kernels.use_backend("triton"):
        via_triton = kernels.paged_attention(*batch.attention_args())
    torch.testing.assert_close(via_torch, via_triton, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    sequences=st.lists(
        st.tuples(st.integers(1, 40), st.integers(0, 40)),  # (new tokens, cached context)
        min_size=1,
        max_size=5,
    ),
    group=st.sampled_from([1, 3]),
    block_size=st.sampled_from([4, 16]),
)
def test_torch_path_matches_the_definition_on_any_ragged_batch(sequences, group, block_size):
    q_lens = [q_len for q_len, _ in sequences]
    seq_lens = [q_len + context for q_len, context in sequences]
    batch = make_paged_batch(q_lens, seq_lens, 2 * group, 2, 8, block_size=block_size)
    out = kernels.paged_attention(*batch.attention_args())
    torch.testing.assert_close(out.double(), naive_attention(batch), atol=1e-5, rtol=1e-5)
