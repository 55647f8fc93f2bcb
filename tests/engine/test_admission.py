"""Admission control: past --max-num-queued-requests / --max-num-queued-tokens a request is refused
at once with a 503 (the queue does not grow into latency nobody waits for), and admitted again once
the queue drains."""

from __future__ import annotations

from pathlib import Path

from engine.engine import Engine, EngineConfig
from protocol.engine_api import Failed, Generate, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)


def test_requests_past_the_queue_limit_are_503s_until_it_drains(tiny_llama: Path):
    engine = Engine(EngineConfig(model=str(tiny_llama), progress=False, max_num_queued_requests=2))
    events = engine.step_sync([Generate(f"r{i}", (1, 2, 3), PARAMS) for i in range(3)])
    refused = [e for e in events if isinstance(e, Failed)]
    assert [(e.request_id, e.status) for e in refused] == [("r2", 503)]
    assert "--max-num-queued-requests 2" in refused[0].message
    # the first two were scheduled by that step: the queue is empty again
    events = engine.step_sync([Generate("r3", (1, 2, 3), PARAMS)])
    assert not any(isinstance(e, Failed) for e in events)


def test_prompt_tokens_past_the_queue_limit_are_503s(tiny_llama: Path):
    engine = Engine(EngineConfig(model=str(tiny_llama), progress=False, max_num_queued_tokens=10))
    events = engine.step_sync(
        [Generate("a", tuple(range(1, 7)), PARAMS), Generate("b", tuple(range(1, 7)), PARAMS)]
    )
    (refused,) = [e for e in events if isinstance(e, Failed)]
    assert refused.request_id == "b" and refused.status == 503
    assert "6 prompt tokens are waiting" in refused.message


def test_a_request_not_scheduled_within_the_queue_time_fails_with_a_503(tiny_llama: Path):
    engine = Engine(EngineConfig(model=str(tiny_llama), progress=False, max_num_seqs=1))
    long = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert not any(isinstance(e, Failed) for e in engine.step_sync([Generate("running", (1, 2, 3), long)]))
    engine.core.max_queue_seconds = 0.0  # from now on nobody may wait (the running one was scheduled)
    events = engine.step_sync([Generate("waiting", (1, 2, 3), PARAMS)])
    (expired,) = [e for e in events if isinstance(e, Failed)]
    assert (expired.request_id, expired.status) == ("waiting", 503)
    assert "--max-queue-time" in expired.message
    assert "waiting" not in engine.core.requests and "running" in engine.core.requests
    assert engine.core.scheduler.num_waiting == 0
