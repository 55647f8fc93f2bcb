"""Batch-invariant mode: a row's result is bitwise identical alone or anywhere inside batches of any size,
for the matmul, norm and attention paths the mode swaps in; the default mode stays on the fast paths."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.torch_ops import linear as torch_linear
from kernels.triton_ops import linear as triton_linear
from tests.kernels.paged import make_paged_batch
from tests.kernels.tolerances import tolerance

BATCH_SIZES_AND_POSITIONS = [(1, 0), (2, 1), (3, 0), (7, 5), (8, 7), (9, 8), (16, 3), (33, 20), (64, 63)]


@pytest.fixture(params=["torch", "cpp"])
def invariant(request):
    """Batch-invariant mode on the torch path and on the C++ CPU kernels (which the mode uses when built)."""
    with kernels.use_backend(request.param), kernels.batch_invariant():
        yield


def _row_inside_batches(compute, row, width, dtype=torch.float32):
    """compute(batch) for batches holding `row` at various positions among random rows -> that row's outputs."""
    generator = torch.Generator().manual_seed(1)
    results = []
    for size, position in BATCH_SIZES_AND_POSITIONS:
        batch = torch.randn(size, width, generator=generator).to(dtype)
        batch[position] = row
        results.append(compute(batch)[position])
    return results


@pytest.mark.parametrize(("in_features", "out_features"), [(576, 1536), (1536, 576), (100, 37)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_row_is_bitwise_identical_in_any_batch(invariant, in_features, out_features, with_bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    row = torch.randn(in_features, generator=generator)
    alone = kernels.linear(row[None], weight, bias)[0]
    for result in _row_inside_batches(lambda batch: kernels.linear(batch, weight, bias), row, in_features):
        assert torch.equal(result, alone)
    torch.testing.assert_close(alone, F.linear(row, weight, bias), atol=1e-4, rtol=1e-4)


def test_linear_keeps_leading_dimensions(invariant):
    x, weight = torch.randn(2, 3, 16), torch.randn(5, 16)
    torch.testing.assert_close(kernels.linear(x, weight), F.linear(x, weight))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_row_is_bitwise_identical_in_any_batch(invariant, with_residual):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(576, generator=generator)
    row = torch.randn(576, generator=generator)
    residual_row = torch.randn(576, generator=generator)

    def compute(batch):
        if not with_residual:
            return kernels.rms_norm(batch, weight, 1e-5)
        residual = torch.randn(batch.shape, generator=generator)
        residual[(batch == row).all(-1)] = residual_row
        return kernels.rms_norm(batch, weight, 1e-5, residual)[0]

    alone = compute(row[None])[0]
    for result in _row_inside_batches(compute, row, 576):
        assert torch.equal(result, alone)


def test_attention_of_a_sequence_is_bitwise_identical_whatever_the_other_sequences(invariant):
    # The sequence under test: 3 new tokens after 30 cached ones, then the same as a decode step.
    for q_len, seq_len in [(3, 33), (1, 34)]:
        alone = make_paged_batch([q_len], [seq_len], 9, 3, 64, seed=5)
        expected = kernels.paged_attention(*alone.attention_args())
        for others in ([(1, 70)], [(17, 17), (1, 3), (1, 200)], [(5, 40)] * 4):
            q_lens = [q for q, _ in others] + [q_len]
            seq_lens = [s for _, s in others] + [seq_len]
            batch = make_paged_batch(q_lens, seq_lens, 9, 3, 64, seed=len(others))
            _plant(batch, alone)
            out = kernels.paged_attention(*batch.attention_args())
            assert torch.equal(out[-q_len:], expected)


def test_attention_of_a_token_is_bitwise_identical_however_its_prompt_was_chunked(invariant):
    """A prefix-cache hit or a busy step splits a prompt differently: the last prompt token computed
    in a chunk of 5, of 2, or alone gives the same bits."""
    whole = make_paged_batch([5], [40], 9, 3, 64, seed=11)
    expected = kernels.paged_attention(*whole.attention_args())[-1]
    for q_len in (2, 1):
        part = make_paged_batch([q_len], [40], 9, 3, 64, seed=12)
        _plant(part, whole, rows=q_len)
        assert torch.equal(kernels.paged_attention(*part.attention_args())[-1], expected)


def _plant(batch, single, rows=None):
    """Overwrite the last sequence of `batch` with the one sequence of `single` (same context length;
    its last `rows` query rows, default all)."""
    q_len = single.q_lens[0] if rows is None else rows
    batch.query[-q_len:] = single.query[-q_len:]
    block_size = batch.key_cache.shape[1]
    blocks = batch.block_tables[-1]
    for position in range(int(single.seq_lens[0])):
        block, offset = int(blocks[position // block_size]), position % block_size
        batch.key_cache[block, offset] = single.dense_keys[0][position]
        batch.value_cache[block, offset] = single.dense_values[0][position]


def test_default_mode_uses_the_fast_paths():
    assert not kernels.is_batch_invariant()
    x, weight = torch.randn(3, 64), torch.randn(32, 64)
    assert torch.equal(kernels.linear(x, weight), F.linear(x, weight))


def test_mode_is_restored_after_the_context_manager():
    kernels.set_batch_invariant(False)
    with kernels.batch_invariant():
        assert kernels.is_batch_invariant()
        with kernels.batch_invariant(False):
            assert not kernels.is_batch_invariant()
        assert kernels.is_batch_invariant()
    assert not kernels.is_batch_invariant()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_triton_linear_matches_torch_and_is_batch_invariant(dtype, with_bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(70, 48, generator=generator).to(dtype)
    bias = torch.randn(70, generator=generator).to(dtype) if with_bias else None
    row = torch.randn(48, generator=generator).to(dtype)
    alone = triton_linear.linear(row[None], weight, bias)[0]
    expected = torch_linear.linear(row[None].float(), weight.float(), None if bias is None else bias.float())[0]
    torch.testing.assert_close(alone, expected.to(dtype), **tolerance(dtype))
    for size, position in [(5, 2), (40, 33)]:
        batch = torch.randn(size, 48, generator=generator).to(dtype)
        batch[position] = row
        assert torch.equal(triton_linear.linear(batch, weight, bias)[position], alone)
