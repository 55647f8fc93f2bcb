"""Each sampling parameter does what it says, on small hand-made logits."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.sampler import Sampler, SamplingRow, batched_token_logprobs, prompt_logprobs
from kernels.torch_ops.sampling import top_k_rows
from protocol.engine_api import SamplingParams

# probabilities 0.5, 0.3, 0.15, 0.05 for tokens 0..3, and two near-impossible tokens 4, 5
PROBS = [0.5, 0.3, 0.15, 0.05, 1e-9, 1e-9]
LOGITS = [math.log(p) for p in PROBS]
EOS = 5


def row(prompt=(), output=(), seed=None, **params) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), frozenset({EOS}), generator)


def sample(rows, logits=None, shared_seed=0):
    logits = torch.tensor([logits or LOGITS] * len(rows), dtype=torch.float32)
    return Sampler(torch.Generator().manual_seed(shared_seed))(logits, rows)


def draws(n=400, logits=None, **params) -> Counter:
    """Token counts over n independent draws (one row each, seeded differently)."""
    rows = [row(seed=i, **params) for i in range(n)]
    return Counter(sample(rows, logits).token_ids)


def test_greedy_takes_the_argmax():
    assert sample([row(temperature=0.0)]).token_ids == [0]


def test_sampling_follows_the_distribution():
    counts = draws(2000, temperature=1.0)
    assert set(counts) <= {0, 1, 2, 3}
    assert abs(counts[0] / 2000 - 0.5) < 0.05
    assert abs(counts[1] / 2000 - 0.3) < 0.05


def test_temperature_sharpens_and_flattens():
    cold = draws(temperature=0.2)
    hot = draws(temperature=5.0)
    assert cold[0] > 0.9 * sum(cold.values())
    assert hot[4] + hot[5] == 0 or hot[0] < 0.5 * sum(hot.values())
    assert hot[3] > cold[3]


def test_top_k_keeps_the_k_best():
    assert set(draws(top_k=2)) == {0, 1}
    assert set(draws(top_k=1, temperature=3.0)) == {0}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert set(draws(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(top_p=0.45)) == {0}
    assert set(draws(top_p=0.85)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert set(draws(min_p=0.2)) == {0, 1, 2}  # threshold 0.1
    assert set(draws(min_p=0.7)) == {0}  # threshold 0.35


def test_logit_bias_moves_a_token():
    assert sample([row(temperature=0.0, logit_bias={3: 10.0})]).token_ids == [3]
    assert sample([row(temperature=0.0, logit_bias={0: -100.0})]).token_ids == [1]


def test_allowed_token_ids_restrict_the_choice():
    assert set(draws(allowed_token_ids=(2, 3))) == {2, 3}
    assert sample([row(temperature=0.0, allowed_token_ids=(4,))]).token_ids == [4]


def test_bad_words_single_token_is_always_banned():
    assert sample([row(temperature=0.0, bad_words_token_ids=((0,),))]).token_ids == [1]


def test_bad_words_multi_token_bans_the_last_token_only_after_the_prefix():
    words = ((3, 0),)
    assert sample([row(temperature=0.0, bad_words_token_ids=words, output=[1])]).token_ids == [0]
    assert sample([row(temperature=0.0, bad_words_token_ids=words, output=[1, 3])]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    eos_first = [0.0] * 6
    eos_first[EOS] = 10.0
    eos_first[2] = 5.0
    eos_first[1] = 4.0
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=(2,))
    assert sample([row(output=[1], **params)], eos_first).token_ids == [1]  # EOS and stop id 2 masked
    assert sample([row(output=[1, 1], **params)], eos_first).token_ids == [EOS]  # reached
    # ignore_eos: EOS is a normal token, never masked
    assert sample([row(output=[1], ignore_eos=True, **params)], eos_first).token_ids == [EOS]


def test_repetition_penalty_covers_prompt_and_output():
    logits = [2.0, 1.9, -1.0, -1.0, -5.0, -5.0]
    assert sample([row(temperature=0.0, repetition_penalty=1.2, prompt=[0])], logits).token_ids == [1]
    assert sample([row(temperature=0.0, repetition_penalty=1.2, output=[0])], logits).token_ids == [1]
    assert sample([row(temperature=0.0, repetition_penalty=1.2, prompt=[3])], logits).token_ids == [0]


def test_repetition_penalty_pushes_negative_logits_further_down():
    logits = [-1.0, -1.1, -5.0, -5.0, -5.0, -5.0]
    assert sample([row(temperature=0.0, repetition_penalty=1.5, output=[0])], logits).token_ids == [1]


def test_frequency_penalty_scales_with_the_count():
    logits = [2.0, 1.0, 0.0, -5.0, -5.0, -5.0]
    once = row(temperature=0.0, frequency_penalty=0.6, output=[0])
    twice = row(temperature=0.0, frequency_penalty=0.6, output=[0, 0])
    assert sample([once], logits).token_ids == [0]  # 2.0 - 0.6 > 1.0
    assert sample([twice], logits).token_ids == [1]  # 2.0 - 1.2 < 1.0


def test_presence_penalty_does_not_scale_with_the_count():
    logits = [2.0, 1.0, 0.0, -5.0, -5.0, -5.0]
    assert sample([row(temperature=0.0, presence_penalty=0.6, output=[0, 0, 0])], logits).token_ids == [0]
    assert sample([row(temperature=0.0, presence_penalty=1.5, output=[0])], logits).token_ids == [1]


def test_penalties_ignore_tokens_never_seen():
    logits = [2.0, 1.0, 0.0, -5.0, -5.0, -5.0]
    params = dict(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=2.0)
    assert sample([row(output=[4, 4], prompt=[5], **params)], logits).token_ids == [0]


def test_a_seeded_row_does_not_depend_on_the_rest_of_the_batch():
    def tokens_of_seeded_row(others: int, shared_seed: int) -> list[int]:
        out = []
        gen = torch.Generator().manual_seed(1234)
        for _ in range(30):
            rows = [row(temperature=1.0) for _ in range(others)]
            rows.insert(others // 2, SamplingRow(SamplingParams(temperature=1.0), [], [], frozenset(), gen))
            out.append(sample(rows, shared_seed=shared_seed).token_ids[others // 2])
        return out

    alone = tokens_of_seeded_row(0, 0)
    assert tokens_of_seeded_row(5, 1) == alone
    assert tokens_of_seeded_row(2, 2) == alone
    assert len(set(alone)) > 1  # it really samples


def test_unseeded_rows_differ_between_shared_generator_states():
    a = sample([row(temperature=1.0) for _ in range(50)], shared_seed=1).token_ids
    b = sample([row(temperature=1.0) for _ in range(50)], shared_seed=2).token_ids
    assert a != b


def test_logprobs_are_raw_logprobs_with_rank_and_top_k():
    result = sample([row(temperature=0.5, logit_bias={3: 100.0}, logprobs=2)])
    assert result.token_ids == [3]
    top = result.top_logprobs[0]
    assert top.token_id == 3
    # raw: before bias and temperature, so token 3 keeps its original probability and rank
    assert top.logprob == pytest.approx(math.log(0.05), abs=1e-4)
    assert top.rank == 4
    assert [t for t, _ in top.top] == [0, 1]
    assert top.top[0][1] == pytest.approx(math.log(0.5), abs=1e-4)
    assert result.logprobs[0] == pytest.approx(math.log(0.05), abs=1e-4)


def test_logprobs_absent_unless_asked_and_zero_gives_only_the_chosen_token():
    result = sample([row(temperature=0.0), row(temperature=0.0, logprobs=0)])
    assert result.top_logprobs[0] is None
    chosen = result.top_logprobs[1]
    assert (chosen.token_id, chosen.rank, chosen.top) == (0, 1, ())


def test_prompt_logprobs_score_each_target_under_its_row():
    logits = torch.tensor([LOGITS, list(reversed(LOGITS))])
    entries = prompt_logprobs(logits, [1, 2], k=1)
    assert entries[0].token_id == 1 and entries[0].logprob == pytest.approx(math.log(0.3), abs=1e-4)
    assert entries[0].rank == 2 and entries[0].top[0][0] == 0
    # the second row is reversed: token 2 has probability 0.05 there and token 5 is the best
    assert entries[1].token_id == 2 and entries[1].logprob == pytest.approx(math.log(0.05), abs=1e-4)
    assert entries[1].top[0][0] == 5


def test_negative_logprobs_count_asks_for_the_whole_vocabulary():
    (entry,) = prompt_logprobs(torch.tensor([LOGITS]), [2], k=-1)
    assert len(entry.top) == len(LOGITS)
    assert [t for t, _ in entry.top][:4] == [0, 1, 2, 3]  # 4 and 5 tie


def test_batched_logprobs_give_each_row_its_rank_and_top_k():
    """Chosen tokens at the top, inside and outside the top values, and a row that asked for none."""
    logprobs = torch.log_softmax(torch.randn(6, 4096, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    order = logprobs.argsort(dim=1, descending=True)
    positions = [0, 4, 5, 3000, 1, 7]  # rank - 1 of each row's chosen token
    tokens = torch.tensor([int(order[row, p]) for row, p in enumerate(positions)])
    counts = [5, 5, 5, 2, None, 0]
    entries = batched_token_logprobs(logprobs, tokens, counts)
    assert entries[4] is None
    for row, (entry, k) in enumerate(zip(entries, counts, strict=True)):
        if k is None:
            continue
        assert entry.token_id == int(tokens[row]) and entry.rank == positions[row] + 1
        assert entry.logprob == pytest.approx(float(logprobs[row, tokens[row]]))
        assert [t for t, _ in entry.top] == order[row, :k].tolist()


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_rows_equals_torch_topk(k):
    values = torch.randn(7, 49152, generator=torch.Generator().manual_seed(k))
    top, ids = top_k_rows(values, k)
    expected_top, expected_ids = values.topk(k, dim=1)
    assert torch.equal(top, expected_top) and torch.equal(ids, expected_ids)
