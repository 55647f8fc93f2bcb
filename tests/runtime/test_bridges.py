"""The engine bridges under their own runtime: routing, loop-thread delivery, one wake-up per step."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

import anyio
import pytest
import trio

from protocol.engine_api import Abort, Generate, SamplingParams, Tokens
from runtime_asyncio.bridge import AsyncioEngineBridge
from runtime_trio.bridge import TrioEngineBridge
from tests.runtime.fakes import ScriptedEngine

REPLY = "abc"


def generate(request_id: str) -> Generate:
    return Generate(request_id, (1, 2, 3), SamplingParams(max_tokens=16))


async def exercise(bridge, engine: ScriptedEngine) -> dict:
    """Two requests through the bridge; returns what each sink saw and on which thread."""
    loop_thread = threading.get_ident()
    seen: dict[str, list[Tokens]] = {"a": [], "b": []}
    threads: set[int] = set()
    both_finished = anyio.Event()
    dispatches = 0
    dispatch = bridge._dispatch

    def counting_dispatch(events):
        nonlocal dispatches
        dispatches += 1
        dispatch(events)

    bridge._dispatch = counting_dispatch  # counts loop wake-ups

    def sink_for(name):
        def sink(event):
            threads.add(threading.get_ident())
            seen[name].append(event)
            if all(events and events[-1].finish_reason for events in seen.values()):
                both_finished.set()

        return sink

    bridge.start()
    bridge.subscribe("a", sink_for("a"))
    bridge.subscribe("b", sink_for("b"))
    bridge.submit([generate("a"), generate("b")])
    with anyio.fail_after(10):
        await both_finished.wait()
    await bridge.aclose()
    return {"seen": seen, "threads": threads, "loop_thread": loop_thread, "dispatches": dispatches}


RUNS = {
    "asyncio": (AsyncioEngineBridge, lambda async_fn: asyncio.run(async_fn())),
    "trio": (TrioEngineBridge, trio.run),
}


@pytest.mark.parametrize("runtime", RUNS)
def test_bridge_routes_each_step_with_one_wakeup(runtime):
    bridge_class, run = RUNS[runtime]
    engine = ScriptedEngine(reply=REPLY, gate=2)
    result = run(partial(exercise, bridge_class(engine), engine))

    for events in result["seen"].values():
        assert [event.token_ids[0] for event in events[:-1]] == list(REPLY.encode())
        assert events[-1].finish_reason == "stop"
    assert result["threads"] == {result["loop_thread"]}, "sinks run on the loop's thread"
    # both requests ran in lockstep: one step carried both, and each step woke the loop once
    assert engine.steps == len(REPLY) + 1
    assert result["dispatches"] == engine.steps
    assert engine.stopped.is_set()


@pytest.mark.parametrize("bridge_class", [AsyncioEngineBridge, TrioEngineBridge])
def test_unsubscribed_requests_events_are_dropped_and_health_is_the_engines(bridge_class):
    engine = ScriptedEngine(reply=REPLY)
    bridge = bridge_class(engine)
    got = []
    bridge.subscribe("kept", got.append)
    bridge.subscribe("gone", got.append)
    bridge.unsubscribe("gone")
    kept = Tokens("kept", 0, (1,), num_prompt_tokens=1)
    bridge._dispatch(
        [Tokens("gone", 0, (1,), num_prompt_tokens=1), kept, Tokens("other", 0, (1,), num_prompt_tokens=1)]
    )
    assert got == [kept]
    assert bridge.healthy
    engine.healthy = False
    assert not bridge.healthy


@pytest.mark.parametrize("bridge_class", [AsyncioEngineBridge, TrioEngineBridge])
def test_a_failing_sink_does_not_starve_the_others(bridge_class):
    bridge = bridge_class(ScriptedEngine())
    got = []

    def broken(event):
        raise RuntimeError("sink bug")

    bridge.subscribe("broken", broken)
    bridge.subscribe("fine", got.append)
    fine = Tokens("fine", 0, (1,), num_prompt_tokens=1)
    bridge._dispatch([Tokens("broken", 0, (1,), num_prompt_tokens=1), fine])
    assert got == [fine]


@pytest.mark.parametrize("runtime", RUNS)
def test_engine_steps_after_the_loop_ended_are_ignored(runtime):
    bridge_class, run = RUNS[runtime]
    engine = ScriptedEngine(reply=REPLY, hold_after=1)
    bridge = bridge_class(engine)

    async def start():
        bridge.start()

    run(start)  # the loop is over now; the engine thread still runs
    bridge.submit([generate("late")])  # its step is dropped, not an exception killing the engine thread
    bridge.submit([Abort("late")])
    assert engine.aborted.get(timeout=10) == "late"
    engine.shutdown()
