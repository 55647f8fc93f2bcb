"""Decodes keep a bounded step time: the prefill share of a step is sized from the learned step costs."""

from __future__ import annotations

import pytest

from engine.step_budget import StepBudget
from tests.engine.test_scheduler import make, seq, step


def learned(ratio: float = 2.5) -> StepBudget:
    budget = StepBudget(512, ratio)
    budget.observe(num_decodes=32, num_prefill_tokens=0, seconds=0.050)
    budget.observe(num_decodes=32, num_prefill_tokens=100, seconds=0.150)  # 1 ms a prompt token
    return budget


def test_the_prefill_share_keeps_a_step_within_the_ratio_of_a_decode_step():
    budget = learned(2.5)
    assert budget.decode_seconds == pytest.approx(0.050) and budget.prefill_seconds == pytest.approx(0.001)
    assert budget.prefill_tokens(32) == 75  # (2.5 - 1) x 50 ms / 1 ms
    assert learned(1.5).prefill_tokens(32) == 25
    assert learned(1.1).prefill_tokens(32) == 16  # prompts always progress


def test_without_decodes_or_knowledge_or_when_disabled_the_whole_budget_applies():
    assert learned().prefill_tokens(0) == 512  # nothing waits for the step
    assert StepBudget(512, 2.5).prefill_tokens(32) == 480  # nothing learned yet
    assert learned(0).prefill_tokens(32) == 480 and not learned(0).enabled
    assert learned(1000).prefill_tokens(500) == 12  # never past the token budget


def test_a_backlog_of_prompts_is_spread_over_the_next_steps_above_the_bound():
    budget = learned(2.5)  # the bound alone: 75 tokens
    assert budget.prefill_tokens(32, backlog=100) == 75  # the bound is the floor
    assert budget.prefill_tokens(32, backlog=1000) == 250  # a quarter of the backlog each step
    assert budget.prefill_tokens(32, backlog=10_000) == 480  # never past the token budget


def test_the_scheduler_tells_the_limit_how_many_prompt_tokens_wait():
    seen = []

    def limit(decodes: int, backlog: int) -> int:
        seen.append((decodes, backlog))
        return 4

    s = make(max_num_batched_tokens=64, prefill_limit=limit)
    s.add(seq("a", 3))
    step(s)
    s.add(seq("b", 20, start=100))
    s.add(seq("c", 30, start=200))
    step(s)  # a decodes; b and c wait whole
    step(s)  # b has 4 of its 20 computed; c still waits
    assert seen[-2:] == [(1, 50), (1, 46)]


def test_costs_follow_the_machine_smoothly():
    budget = learned()
    budget.observe(32, 0, 0.100)  # one slow decode step moves the estimate a fifth of the way
    assert budget.decode_seconds == pytest.approx(0.060)
    budget.observe(32, 50, 0.010)  # a step faster than a decode step says nothing negative
    assert budget.prefill_seconds == pytest.approx(0.0008)


def test_the_scheduler_gives_prompts_only_what_the_limit_allows_beside_decodes():
    s = make(max_num_batched_tokens=64, prefill_limit=lambda decodes, backlog: 5 if decodes else 64)
    a = seq("a", 3)
    s.add(a)
    assert [c.num_tokens for c in step(s).chunks] == [3]  # alone: the whole budget
    s.add(seq("b", 20, start=100))
    s.add(seq("c", 20, start=200))
    out = step(s)  # a decodes; b's and c's prompts share the 5 tokens left for prefill
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 5)]
    out = step(s)  # b, still prefilling, gets the 5 again; c waits
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 5)]
