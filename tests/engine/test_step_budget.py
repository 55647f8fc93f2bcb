"""Decodes keep a bounded step time: the prefill share of a step is sized from the learned step costs."""

from __future__ import annotations

import pytest

from engine.step_budget import StepBudget
from tests.engine.test_scheduler import make, seq, step


def step_seconds(tokens: int) -> float:
    """A machine where a step that prefills costs 40 ms plus 1 ms a token (decode rows and prompt)."""
    return 0.040 + 0.001 * tokens


def learned(ratio: float = 2.5) -> StepBudget:
    budget = StepBudget(512, ratio)
    for decodes, prompt in [(32, 100), (8, 300), (20, 50), (0, 512)]:
        budget.observe(num_decodes=decodes, num_prefill_tokens=prompt, seconds=step_seconds(decodes + prompt))
    return budget


def test_the_prefill_share_keeps_a_step_within_the_ratio_of_a_loaded_decode_step():
    budget = learned(2.5)
    # A 32-row decode step is expected to take 72 ms; 2.5x that is 180 ms: 108 ms of prompt tokens.
    assert budget.prefill_tokens(32, load=32) == pytest.approx(108, abs=1)
    assert learned(1.5).prefill_tokens(32, load=32) == pytest.approx(36, abs=1)
    assert learned(1.1).prefill_tokens(32, load=32) == 16  # prompts always progress


def test_the_fixed_cost_of_a_step_is_learned_so_small_steps_do_not_look_expensive_per_token():
    budget = learned()
    fixed, per_token = budget.prefill_steps.fit()
    assert fixed == pytest.approx(0.040) and per_token == pytest.approx(0.001)


def test_a_burst_of_arrivals_is_bounded_against_the_load_not_the_few_decodes_running():
    budget = learned(2.5)
    # 2 sequences decode, 30 wait: the reference is the 32-row step the queue is heading for,
    # so the burst drains in steps of ~140 prompt tokens, not the ~63 a 2-row reference allows.
    assert budget.prefill_tokens(2, load=32) == pytest.approx(138, abs=1)
    assert budget.prefill_tokens(2, load=2) == pytest.approx(63, abs=1)


def test_a_slow_decode_only_step_raises_the_reference():
    budget = learned(2.5)
    for _ in range(200):
        budget.observe(num_decodes=32, num_prefill_tokens=0, seconds=0.200)  # slower than the line says
    # 2.5 x 200 ms = 500 ms; the step without prompt tokens is expected at 72 ms: 428 tokens fit.
    assert budget.prefill_tokens(32, load=32) == pytest.approx(428, abs=2)


def test_without_decodes_or_knowledge_or_when_disabled_the_whole_budget_applies():
    assert learned().prefill_tokens(0, load=32) == 512  # nothing waits for the step
    assert StepBudget(512, 2.5).prefill_tokens(32, load=32) == 480  # nothing learned yet
    assert learned(0).prefill_tokens(32, load=32) == 480 and not learned(0).enabled
    assert learned(1000).prefill_tokens(500, load=500) == 12  # never past the token budget


def test_steps_all_of_one_size_teach_no_slope_and_leave_the_budget_whole():
    budget = StepBudget(512, 2.5)
    for _ in range(5):
        budget.observe(num_decodes=32, num_prefill_tokens=100, seconds=0.2)
    assert budget.prefill_steps.fit() is None and budget.prefill_tokens(32, load=32) == 480


def test_costs_follow_the_machine():
    budget = learned()
    for decodes, prompt in [(32, 100), (8, 300), (20, 50), (0, 512)] * 30:  # the machine got 2x slower
        budget.observe(decodes, prompt, 2 * step_seconds(decodes + prompt))
    fixed, per_token = budget.prefill_steps.fit()
    assert fixed == pytest.approx(0.080, rel=0.05) and per_token == pytest.approx(0.002, rel=0.05)


def test_the_scheduler_tells_the_limit_how_many_sequences_run_or_wait():
    seen = []

    def limit(decodes: int, load: int) -> int:
        seen.append((decodes, load))
        return 4

    s = make(max_num_batched_tokens=64, prefill_limit=limit)
    s.add(seq("a", 3))
    step(s)
    s.add(seq("b", 20, start=100))
    s.add(seq("c", 30, start=200))
    step(s)  # a decodes; b and c wait
    step(s)  # b runs with 4 of its 20 computed; c still waits
    assert seen[-2:] == [(1, 3), (1, 3)]


def test_the_scheduler_gives_prompts_only_what_the_limit_allows_beside_decodes():
    s = make(max_num_batched_tokens=64, prefill_limit=lambda decodes, load: 5 if decodes else 64)
    a = seq("a", 3)
    s.add(a)
    assert [c.num_tokens for c in step(s).chunks] == [3]  # alone: the whole budget
    s.add(seq("b", 20, start=100))
    s.add(seq("c", 20, start=200))
    out = step(s)  # a decodes; b's and c's prompts share the 5 tokens left for prefill
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 5)]
    out = step(s)  # b, still prefilling, gets the 5 again; c waits
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 5)]
