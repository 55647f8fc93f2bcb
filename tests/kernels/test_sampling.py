"""Sampling: greedy rows, the min-p / top-k / top-p masks against their definitions, seeded reproducibility,
the draw's distribution, and the triton masking kernel against the torch path."""

import pytest
import torch

from kernels.torch_ops import sampling as torch_sampling
from kernels.triton_ops import sampling as triton_sampling


def _logits(batch, vocab, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _params(rows):
    """rows: (temperature, top_k, top_p, min_p) per row -> the four [B] tensors."""
    temperature, top_k, top_p, min_p = zip(*rows, strict=True)
    return (
        torch.tensor(temperature, dtype=torch.float32),
        torch.tensor(top_k, dtype=torch.int32),
        torch.tensor(top_p, dtype=torch.float32),
        torch.tensor(min_p, dtype=torch.float32),
    )


def _expected_kept(row_logits, temperature, top_k, top_p, min_p):
    """The set of token ids the filters keep, straight from their definitions (float64)."""
    scaled = row_logits.double() / temperature
    probs = scaled.softmax(-1)
    kept = [i for i in range(len(scaled)) if min_p <= 0 or probs[i] >= min_p * probs.max()]
    kept.sort(key=lambda i: -scaled[i])
    if 0 < top_k < len(scaled):
        kept = kept[:top_k]
    if top_p < 1:
        mass = scaled[kept].softmax(-1)
        cumulative_before = torch.cumsum(mass, 0) - mass
        kept = [token for token, before in zip(kept, cumulative_before, strict=True) if before < top_p]
    return set(kept)


ROWS = [
    (1.0, 0, 1.0, 0.0),  # no filter
    (0.7, 5, 1.0, 0.0),  # top-k alone
    (1.3, 0, 0.8, 0.0),  # top-p alone
    (1.0, 0, 1.0, 0.1),  # min-p alone
    (0.9, 20, 0.9, 0.05),  # all three
    (1.0, -1, 0.5, 0.0),  # top_k -1 means off
    (2.0, 3, 0.3, 0.2),
    (0.0, 4, 0.5, 0.0),  # greedy row: scaled by 1, filters still reported
]


@pytest.mark.parametrize("vocab", [7, 300])
def test_masks_keep_exactly_the_tokens_the_definitions_keep(vocab):
    logits = _logits(len(ROWS), vocab)
    masked = torch_sampling.apply_sampling_masks(logits, *_params(ROWS))
    for row, (temperature, top_k, top_p, min_p) in enumerate(ROWS):
        kept = set(torch.isfinite(masked[row]).nonzero().flatten().tolist())
        assert kept == _expected_kept(logits[row], max(temperature, 1.0) if temperature == 0 else temperature,
                                      top_k, top_p, min_p), f"row {row}"
        scale = temperature if temperature > 0 else 1.0
        torch.testing.assert_close(masked[row, list(kept)], logits[row, list(kept)] / scale)


def test_top_p_reaching_past_the_candidate_window_falls_back_to_a_full_sort():
    # Near-flat rows keep hundreds of tokens, beyond the 256 largest the fast path looks at.
    logits = torch.cat([_logits(1, 2000, seed=3) * 0.01, _logits(1, 2000, seed=4)])
    rows = [(1.0, 0, 0.5, 0.0), (1.0, 0, 0.5, 0.0)]
    masked = torch_sampling.apply_sampling_masks(logits, *_params(rows))
    for row in range(2):
        kept = set(torch.isfinite(masked[row]).nonzero().flatten().tolist())
        assert kept == _expected_kept(logits[row], *rows[row])
    assert torch.isfinite(masked[0]).sum() > 256


def test_top_p_cut_found_in_each_window_of_a_large_vocabulary():
    # A vocabulary large enough for the chunked search of the 32 largest: a peaked row (cut among
    # the first 32), rows whose kept sets are ~100 and ~1000 tokens (among the 4096 largest, by
    # torch's topk and numpy's partition), and a flat one (full sort).
    vocab = 16384
    logits = _logits(4, vocab, seed=5)
    logits[0] *= 8
    logits[1, :100] = 12 + 0.1 * logits[1, :100]
    logits[2, :1000] = 12 + 0.1 * logits[2, :1000]
    logits[3] *= 0.01
    rows = [(1.0, 0, 0.9, 0.0)] * 4
    masked = torch_sampling.apply_sampling_masks(logits, *_params(rows))
    sizes = []
    for row in range(4):
        kept = set(torch.isfinite(masked[row]).nonzero().flatten().tolist())
        assert kept == _expected_kept(logits[row], *rows[row]), f"row {row}"
        sizes.append(len(kept))
    first, wide = torch_sampling.TOP_P_FIRST_CANDIDATES, torch_sampling.TOP_P_WIDE_CANDIDATES
    assert sizes[0] <= first < sizes[1] < sizes[2] <= wide < sizes[3]


def test_top_k_keeps_ties_with_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    masked = torch_sampling.apply_sampling_masks(logits, *_params([(1.0, 2, 1.0, 0.0)]))
    assert torch.isfinite(masked).tolist() == [[True, False, True, True, False]]


def test_greedy_rows_take_the_argmax_of_the_raw_logits_whatever_the_filters():
    logits = _logits(4, 50)
    rows = [(0.0, 0, 1.0, 0.0), (0.0, 3, 0.1, 0.5), (1e-6, 0, 1.0, 0.0), (0.0, 1, 1.0, 0.0)]
    tokens = torch_sampling.sample(logits, *_params(rows), [None] * 4)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_even_at_high_temperature():
    logits = _logits(3, 100)
    generators = [torch.Generator().manual_seed(row) for row in range(3)]
    tokens = torch_sampling.sample(logits, *_params([(5.0, 1, 1.0, 0.0)] * 3), generators)
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_sampled_tokens_are_never_masked_tokens():
    logits = _logits(len(ROWS), 300)
    params = _params(ROWS)
    masked = torch_sampling.apply_sampling_masks(logits, *params)
    for seed in range(20):
        generators = [torch.Generator().manual_seed(seed * 100 + row) for row in range(len(ROWS))]
        tokens = torch_sampling.sample(logits, *params, generators)
        assert torch.isfinite(masked.gather(1, tokens[:, None])).all()


@pytest.mark.parametrize("seed", range(0, 300, 10))
def test_a_seeded_row_samples_the_same_token_whatever_else_is_in_the_batch(seed):
    # Rows kept small (drawn among their candidates) and large (drawn over the whole vocabulary),
    # alone and beside rows whose top_k widens the candidates every row gets.
    logits = _logits(7, 1000)
    rows = [(1.0, 0, 1.0, 0.0), (0.8, 50, 0.95, 0.0), (1.2, 0, 0.9, 0.02), (0.0, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0),
            (1.5, 0, 1.0, 0.0), (1.0, 0, 0.3, 0.0)]
    alone = [
        torch_sampling.sample(logits[row : row + 1], *_params([rows[row]]), [torch.Generator().manual_seed(seed)])
        .item()
        for row in range(len(rows))
    ]
    for order in ([0, 1, 2, 3, 4, 5, 6], [5, 3, 1, 4, 0, 2, 6], [6, 4, 2, 0]):
        params = _params([rows[row] for row in order])
        generators = [torch.Generator().manual_seed(seed) if row % 2 == 0 else None for row in order]
        tokens = torch_sampling.sample(logits[order], *params, generators).tolist()
        for position, row in enumerate(order):
            if row % 2 == 0:
                assert tokens[position] == alone[row], (order, row)


def test_same_seed_same_tokens_step_after_step():
    logits = _logits(2, 500)
    params = _params([(1.0, 0, 1.0, 0.0), (0.7, 40, 0.9, 0.0)])

    def run():
        generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
        return [torch_sampling.sample(logits, *params, generators).tolist() for _ in range(5)]

    first = run()
    assert first == run()
    assert len({tuple(step) for step in first}) > 1  # the generators advance between steps


def test_draws_follow_the_masked_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, top_k, top_p, min_p = 1.0, 4, 1.0, 0.0
    draws = 4000
    params = _params([(temperature, top_k, top_p, min_p)] * draws)
    generators = [torch.Generator().manual_seed(seed) for seed in range(draws)]
    tokens = torch_sampling.sample(logits.expand(draws, -1).contiguous(), *params, generators)
    frequencies = torch.bincount(tokens, minlength=6).double() / draws
    expected = torch.cat([logits[0, :4].double().softmax(-1), torch.zeros(2, dtype=torch.float64)])
    torch.testing.assert_close(frequencies, expected, atol=0.03, rtol=0)


@pytest.mark.parametrize("vocab", [7, 300, 5000])
def test_triton_masks_match_torch_masks(vocab):
    logits = _logits(len(ROWS), vocab, seed=vocab)
    params = _params(ROWS)
    got = triton_sampling.apply_sampling_masks(logits, *params)
    expected = torch_sampling.apply_sampling_masks(logits, *params)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    torch.testing.assert_close(got, expected)


def test_triton_top_k_keeps_ties_like_the_torch_path():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [-1.0, -1.0, -1.0, -2.0, -0.5]])
    params = _params([(1.0, 2, 1.0, 0.0), (1.0, 2, 1.0, 0.0)])
    got = triton_sampling.apply_sampling_masks(logits, *params)
    assert torch.isfinite(got).tolist() == torch.isfinite(torch_sampling.apply_sampling_masks(logits, *params)).tolist()


def test_triton_sample_draws_the_same_tokens_as_the_torch_path():
    logits = _logits(len(ROWS), 300, seed=1)
    params = _params(ROWS)

    def generators():
        return [torch.Generator().manual_seed(row) for row in range(len(ROWS))]

    for _ in range(2):
        assert (
            triton_sampling.sample(logits, *params, generators()).tolist()
            == torch_sampling.sample(logits, *params, generators()).tolist()
        )


def test_row_argmax_is_torchs_argmax_with_first_maximum_on_ties():
    from kernels.torch_ops.sampling import argmax_rows

    values = torch.randn(32, 49152, generator=torch.Generator().manual_seed(0))
    values[3, [7, 70, 700]] = 100.0  # a three-way tie: the first index wins
    values[5, 9] = float("nan")  # NaN counts as the maximum, as in torch
    got = argmax_rows(values)
    assert got.dtype == torch.int64
    assert torch.equal(got, values.argmax(dim=-1))
    assert got[3] == 7 and got[5] == 9
    assert torch.equal(argmax_rows(values[:, ::2]), values[:, ::2].argmax(dim=-1))  # strided rows


def test_a_token_at_minus_infinity_is_never_drawn_even_at_a_uniform_of_zero(monkeypatch):
    # Processors (allowed tokens, bad words) mask with -inf; rows filtered by top-k and not at all
    # share the batch, so both the candidate draw and the whole-vocabulary draw are taken.
    monkeypatch.setattr(torch_sampling, "uniforms", lambda generators, device: torch.zeros(len(generators), 1))
    logits = _logits(3, 300)
    logits[:, :150] = float("-inf")
    params = _params([(1.0, 0, 1.0, 0.0), (1.0, 200, 1.0, 0.0), (1.0, 5, 1.0, 0.0)])
    tokens = torch_sampling.sample(logits, *params, [None] * 3)
    assert (tokens >= 150).all(), tokens
