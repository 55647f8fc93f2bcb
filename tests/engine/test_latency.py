"""Request latencies the engine reports for vLLM's histograms (engine.latency)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.engine import Engine, EngineConfig
from protocol.engine_api import Generate, SamplingParams, StructuredOutput


class Recorder:
    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {"queue": [], "ttft": [], "itl": [], "e2e": []}

    def queue_time(self, seconds: float) -> None:
        self.seen["queue"].append(seconds)

    def time_to_first_token(self, seconds: float) -> None:
        self.seen["ttft"].append(seconds)

    def inter_token(self, seconds: float) -> None:
        self.seen["itl"].append(seconds)

    def end_to_end(self, seconds: float) -> None:
        self.seen["e2e"].append(seconds)


@pytest.fixture
def engine(tiny_llama: Path) -> Engine:
    return Engine(EngineConfig(model=str(tiny_llama), progress=False))


def test_each_request_reports_queue_ttft_one_itl_per_later_step_and_e2e(engine):
    recorder = Recorder()
    engine.observe_latency(recorder)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    events = engine.generate_sync([Generate("a", (1, 2, 3), params), Generate("b", (4, 5), params)])
    assert sum(len(e.token_ids) for e in events) == 10
    seen = recorder.seen
    assert len(seen["queue"]) == 2 and len(seen["ttft"]) == 2 and len(seen["e2e"]) == 2
    assert len(seen["itl"]) == 2 * 4  # one per step after the first token, per sample
    assert all(value >= 0 for values in seen.values() for value in values)
    for queue, ttft, e2e in zip(seen["queue"], seen["ttft"], seen["e2e"], strict=True):
        assert queue <= ttft <= e2e


def test_n_samples_count_once_per_request_and_per_sample(engine):
    recorder = Recorder()
    engine.observe_latency(recorder)
    params = SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=4, ignore_eos=True)
    engine.generate_sync([Generate("n", (1, 2, 3), params)])
    assert len(recorder.seen["ttft"]) == 1 and len(recorder.seen["e2e"]) == 1
    assert len(recorder.seen["itl"]) == 3 * 3


def test_queue_time_of_a_constrained_request_includes_its_guide_compile(engine):
    recorder = Recorder()
    engine.observe_latency(recorder)
    params = SamplingParams(temperature=0.0, max_tokens=2, structured=StructuredOutput(choice=("ab", "cd")))
    events = engine.generate_sync([Generate("c", (1, 2, 3), params)])
    assert events[-1].finish_reason is not None
    (queue,) = recorder.seen["queue"]
    (compile_time,) = [t.seconds for t in engine.core.guides.timings]
    assert queue >= compile_time
