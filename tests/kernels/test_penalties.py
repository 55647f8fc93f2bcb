"""Penalties against vLLM's definitions element by element, and the triton kernel against the torch path."""

import pytest
import torch

from kernels.torch_ops.penalties import apply_penalties as torch_apply_penalties
from kernels.triton_ops.penalties import apply_penalties as triton_apply_penalties

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
