"""Penalties against vLLM's definitions element by element, and the triton kernel against the torch path."""

import pytest
import torch

from kernels.torch_ops.penalties import apply_penalties as torch_apply_penalties
from kernels.torch_ops.penalties import apply_token_penalties as torch_apply_token_penalties
from kernels.torch_ops.penalties import seen_tokens
from kernels.triton_ops.penalties import apply_penalties as triton_apply_penalties
from kernels.triton_ops.penalties import apply_token_penalties as triton_apply_token_penalties

VOCAB = 12
PROMPTS = [[1, 2, 2, 3], [5], [], [0, 11]]
OUTPUTS = [[3, 3, 4], [], [7, 7, 7, 8], [11]]
REPETITION = [1.3, 2.0, 1.0, 0.8]
FREQUENCY = [0.5, 0.0, 0.25, -0.5]
PRESENCE = [0.1, 0.0, 1.0, 0.3]


def _padded(rows, pad):
    width = max(len(row) for row in rows) or 1
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.int64)


def _naive(logits):
    out = logits.clone()
    for row in range(logits.shape[0]):
        for token in range(VOCAB):
            value = out[row, token].item()
            if token in PROMPTS[row] or token in OUTPUTS[row]:
                value = value / REPETITION[row] if value > 0 else value * REPETITION[row]
            count = OUTPUTS[row].count(token)
            value -= FREQUENCY[row] * count
            value -= PRESENCE[row] * (count > 0)
            out[row, token] = value
    return out


def _args(pad):
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 2
    penalties = [torch.tensor(values, dtype=torch.float32) for values in (REPETITION, FREQUENCY, PRESENCE)]
    return logits, _padded(PROMPTS, pad), _padded(OUTPUTS, pad), *penalties


IMPLEMENTATIONS = {"torch": torch_apply_penalties, "triton": triton_apply_penalties}
TOKEN_IMPLEMENTATIONS = {"torch": torch_apply_token_penalties, "triton": triton_apply_token_penalties}


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("pad", [-1, VOCAB])
def test_penalties_follow_vllm_semantics(implementation, pad):
    logits, *rest = _args(pad)
    expected = _naive(logits)
    result = IMPLEMENTATIONS[implementation](logits, *rest)
    assert result is logits  # in place
    torch.testing.assert_close(result, expected)


def test_neutral_penalties_change_nothing():
    logits, prompts, outputs, *_ = _args(-1)
    before = logits.clone()
    neutral = torch.ones(4), torch.zeros(4), torch.zeros(4)
    torch_apply_penalties(logits, prompts, outputs, *neutral)
    assert torch.equal(logits, before)


def test_triton_kernel_matches_torch_path_over_a_real_vocabulary():
    generator = torch.Generator().manual_seed(1)
    vocab = 3000
    logits = torch.randn(3, vocab, generator=generator)
    prompts = torch.randint(-1, vocab, (3, 40), generator=generator)
    outputs = torch.randint(-1, vocab, (3, 25), generator=generator)
    penalties = torch.rand(3, generator=generator) + 0.5, torch.rand(3, generator=generator), torch.rand(3, generator=generator)
    expected = torch_apply_penalties(logits.clone(), prompts, outputs, *penalties)
    torch.testing.assert_close(triton_apply_penalties(logits, prompts, outputs, *penalties), expected)


def test_seen_tokens_lists_each_rows_distinct_ids_with_output_counts():
    _, prompts, outputs, *_ = _args(-1)
    ids, counts = seen_tokens(prompts, outputs, VOCAB)
    for row in range(4):
        width = len(set(PROMPTS[row]) | set(OUTPUTS[row]))
        assert (ids[row, width:] == -1).all()
        seen = dict(zip(ids[row, :width].tolist(), counts[row, :width].tolist(), strict=True))
        assert seen == {token: OUTPUTS[row].count(token) for token in set(PROMPTS[row]) | set(OUTPUTS[row])}


@pytest.mark.parametrize("implementation", list(TOKEN_IMPLEMENTATIONS))
def test_token_form_in_any_order_with_any_padding_equals_the_history_form(implementation):
    """What a processor keeps (tokens in first-seen order, columns to spare) gives vLLM's result."""
    logits, *_ = _args(-1)
    expected = _naive(logits)
    width = 8
    ids = torch.full((4, width), VOCAB + 3, dtype=torch.int64)
    counts = torch.zeros(4, width, dtype=torch.int32)
    for row in range(4):
        order = list(dict.fromkeys(OUTPUTS[row] + PROMPTS[row]))
        ids[row, : len(order)] = torch.tensor(order, dtype=torch.int64)
        counts[row, : len(order)] = torch.tensor([OUTPUTS[row].count(t) for t in order], dtype=torch.int32)
    penalties = [torch.tensor(values, dtype=torch.float32) for values in (REPETITION, FREQUENCY, PRESENCE)]
    result = TOKEN_IMPLEMENTATIONS[implementation](logits, ids, counts, *penalties)
    assert result is logits
    torch.testing.assert_close(result, expected)


def test_triton_token_kernel_matches_torch_over_a_wide_row():
    """More seen tokens than one block holds, with int32 ids as the processor may pass."""
    generator = torch.Generator().manual_seed(2)
    vocab, width = 5000, 1500
    logits = torch.randn(2, vocab, generator=generator)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:width] for _ in range(2)]).to(torch.int32)
    ids[1, 1400:] = -1
    counts = torch.randint(0, 4, (2, width), generator=generator, dtype=torch.int32)
    penalties = torch.tensor([1.3, 0.7]), torch.tensor([0.2, 0.5]), torch.tensor([0.1, 1.0])
    expected = torch_apply_token_penalties(logits.clone(), ids, counts, *penalties)
    torch.testing.assert_close(triton_apply_token_penalties(logits, ids, counts, *penalties), expected)
