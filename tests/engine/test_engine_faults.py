"""Engine faults: an exception in a step fails the requests in flight (a generic 500 naming each
request, the traceback in the log), the model's core is rebuilt over its loaded weights, and the
engine goes on serving: no request hangs, the thread and the other models live on."""

from __future__ import annotations

import logging
from pathlib import Path

from protocol.engine_api import Failed, Tokens
from tests.engine.test_engine import Recorder, gen, new_engine, outputs


class Fault:
    """Makes the model's forward pass raise while `armed` (a test hook on the runner)."""

    def __init__(self, runner, times: int | None) -> None:
        self.forward = runner.forward
        self.times = times  # None: every step
        self.raised = 0
        runner.forward = self

    def __call__(self, *args, **kwargs):
        if self.times is None or self.raised < self.times:
            self.raised += 1
            raise RuntimeError("injected fault: secret-internal-detail")
        return self.forward(*args, **kwargs)


def test_a_failing_step_fails_its_requests_then_the_engine_serves_again(tiny_llama: Path, caplog):
    engine = new_engine(tiny_llama)
    Fault(engine.core.runner, times=1)
    recorder = Recorder()
    engine.start(recorder)
    try:
        with caplog.at_level(logging.ERROR, logger="engine.engine"):
            engine.submit([gen("a", max_tokens=4), gen("b", max_tokens=4)])
            failed = [e for events in recorder.until_finished({"a", "b"}) for e in events]
        assert {(e.request_id, e.status) for e in failed} == {("a", 500), ("b", 500)}
        for event in failed:
            assert event.message == f"Internal server error while serving request {event.request_id}; the engine was restarted."
        assert "secret-internal-detail" in caplog.text and "Traceback" in caplog.text  # in the log only
        assert engine.restarts == 1 and engine.healthy
        engine.submit([gen("c", max_tokens=3)])
        served = [e for events in recorder.until_finished({"c"}) for e in events]
        assert sum(len(e.token_ids) for e in served if isinstance(e, Tokens)) == 3
        assert engine.core.kv.pool.usage() == 0  # nothing of the failed requests is held
    finally:
        engine.shutdown()


def test_a_fault_on_every_step_never_hangs_and_serving_resumes_when_it_stops(tiny_llama: Path):
    engine = new_engine(tiny_llama)
    recorder = Recorder()
    engine.start(recorder)
    try:
        for round_ in range(4):
            if not isinstance(engine.core.runner.forward, Fault):  # a rebuilt core has a new runner
                fault = Fault(engine.core.runner, times=None)
            engine.submit([gen(f"x{round_}", max_tokens=2), gen(f"y{round_}", max_tokens=2)])
            events = [e for call in recorder.until_finished({f"x{round_}", f"y{round_}"}) for e in call]
            assert all(isinstance(e, Failed) and e.status == 500 for e in events)
        fault.times = 0  # the fault goes away
        engine.submit([gen("ok", max_tokens=2)])
        served = [e for events in recorder.until_finished({"ok"}) for e in events]
        assert all(isinstance(e, Tokens) for e in served) and engine.restarts == 4
    finally:
        engine.shutdown()


POISON = 250  # a token id the poisoned model cannot take


class Poisoned:
    """Makes the model's forward pass raise whenever a batch holds the `POISON` token."""

    def __init__(self, runner) -> None:
        self.forward = runner.forward
        runner.forward = self

    def __call__(self, spans, *args, **kwargs):
        if any(POISON in span.token_ids for span in spans):
            raise RuntimeError("injected fault: poisoned input")
        return self.forward(spans, *args, **kwargs)


def test_a_request_that_breaks_the_batch_fails_alone_and_the_others_finish_untouched(tiny_llama: Path):
    clean = (5, 17, 42, 99, 3, 7)
    alone = new_engine(tiny_llama)
    expected = outputs(alone.generate_sync([gen("a", clean, max_tokens=6), gen("c", clean[::-1], max_tokens=6)]))
    engine = new_engine(tiny_llama)
    Poisoned(engine.core.runner)
    recorder = Recorder()
    engine.start(recorder)
    try:
        engine.submit([gen("a", clean, max_tokens=6), gen("b", (*clean, POISON), max_tokens=6),
                       gen("c", clean[::-1], max_tokens=6)])
        events = [e for call in recorder.until_finished({"a", "b", "c"}) for e in call]
        (failure,) = [e for e in events if isinstance(e, Failed)]
        assert (failure.request_id, failure.status) == ("b", 500)
        assert failure.message == "Internal server error while serving request b."
        assert outputs(events) == expected  # the same tokens as without the poisoned request
        assert engine.restarts == 0 and engine.healthy
        assert engine.core.kv.pool.usage() == 0
    finally:
        engine.shutdown()


def test_a_lone_faulting_request_is_blamed_once_then_a_second_fault_restarts(tiny_llama: Path):
    engine = new_engine(tiny_llama)
    fault = Fault(engine.core.runner, times=None)
    recorder = Recorder()
    engine.start(recorder)
    try:
        engine.submit([gen("x", max_tokens=2)])
        (first,) = [e for call in recorder.until_finished({"x"}) for e in call]
        assert first.message == "Internal server error while serving request x." and engine.restarts == 0
        engine.submit([gen("y", max_tokens=2)])  # fails in a row: engine-wide, the core is rebuilt
        (second,) = [e for call in recorder.until_finished({"y"}) for e in call]
        assert second.message.endswith("the engine was restarted.") and engine.restarts == 1
        fault.times = 0
    finally:
        engine.shutdown()
