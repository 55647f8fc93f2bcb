"""The ASGI shell driven directly (no sockets), for what a socket test cannot pin down exactly."""

from __future__ import annotations

import threading

import anyio
import pytest

from protocol.asgi import NO_FETCHER_MESSAGE, AsgiApp
from protocol.engine_api import Abort, Generate, SamplingParams, Tokens
from protocol.media.fetch import MediaFetched, MediaFetchFailed, MediaRequest
from protocol.outputs import Body, Compute, Computed, EndResponse, Fetch, StartResponse, Submit
from tests.runtime.server import RUNTIMES


class InstantEngine:
    """An EngineClient that answers a Generate at once with three events, before the shell waits."""

    healthy = True

    def __init__(self) -> None:
        self.sinks = {}
        self.submitted = []

    def subscribe(self, request_id, sink):
        self.sinks[request_id] = sink

    def unsubscribe(self, request_id):
        del self.sinks[request_id]

    def submit(self, commands):
        self.submitted += commands
        for command in commands:
            if isinstance(command, Generate):
                for position, token in enumerate(b"abc"):
                    finish = "stop" if position == 2 else None
                    self.sinks[command.request_id](
                        Tokens(command.request_id, 0, (token,), 1, finish_reason=finish)
                    )


class SpyCall:
    model = "m"

    def __init__(self) -> None:
        self.batches = []
        self.finished = False

    def start(self):
        return [Submit((Generate("r1", (1,), SamplingParams()),))]

    def feed(self, events):
        self.batches.append(len(events))
        self.finished = any(event.finish_reason for event in events)
        text = bytes(token for event in events for token in event.token_ids)
        return [StartResponse(200, ()), Body(text), EndResponse()] if self.finished else []

    def disconnected(self):
        return [] if self.finished else [Abort("r1")]


class SpyApp:
    def __init__(self) -> None:
        self.call = SpyCall()

    def handle(self, method, path, headers, body, *, status=None):
        return self.call


async def request(shell: AsgiApp, messages: list[dict]) -> list[dict]:
    sent = []
    incoming = iter(messages)

    async def receive():
        try:
            return next(incoming)
        except StopIteration:
            await anyio.sleep_forever()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "query_string": b"", "headers": []}
    await shell(scope, receive, send)
    return sent


@pytest.mark.parametrize("backend", RUNTIMES)
def test_events_queued_together_are_fed_in_one_batch_and_sinks_are_released(backend):
    app, engine = SpyApp(), InstantEngine()
    shell = AsgiApp(app, {"m": engine})
    sent = anyio.run(
        request, shell, [{"type": "http.request", "body": b"{}", "more_body": False}], backend=backend
    )
    assert app.call.batches == [3]
    assert [message["type"] for message in sent] == [
        "http.response.start",
        "http.response.body",
        "http.response.body",
    ]
    assert sent[1]["body"] == b"abc"
    assert sent[2] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert engine.sinks == {}
    assert not any(isinstance(command, Abort) for command in engine.submitted)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_a_body_split_over_messages_is_joined(backend):
    bodies = []

    class BodyApp(SpyApp):
        def handle(self, method, path, headers, body, *, status=None):
            bodies.append(body)
            return super().handle(method, path, headers, body)

    shell = AsgiApp(BodyApp(), {"m": InstantEngine()})
    chunks = [
        {"type": "http.request", "body": b'{"a"', "more_body": True},
        {"type": "http.request", "body": b": 1}", "more_body": False},
    ]
    anyio.run(request, shell, chunks, backend=backend)
    assert bodies == [b'{"a": 1}']


@pytest.mark.parametrize("backend", RUNTIMES)
def test_lifespan_runs_hooks_and_reports_a_failed_startup(backend):
    log = []

    async def ok():
        log.append("started")

    async def broken():
        raise RuntimeError("no model here")

    async def lifespan(shell, messages):
        sent = []
        incoming = iter(messages)

        async def receive():
            return next(incoming)

        async def send(message):
            sent.append(message)

        await shell({"type": "lifespan"}, receive, send)
        return sent

    good = AsgiApp(SpyApp(), {}, on_startup=[ok], on_shutdown=[ok])
    sent = anyio.run(
        lifespan, good, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}], backend=backend
    )
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert log == ["started", "started"]

    bad = AsgiApp(SpyApp(), {}, on_startup=[broken])
    sent = anyio.run(lifespan, bad, [{"type": "lifespan.startup"}], backend=backend)
    assert sent == [{"type": "lifespan.startup.failed", "message": "RuntimeError: no model here"}]


class FetchingCall(SpyCall):
    """Asks for one medium first; feeds back to `results`, then submits its engine work."""

    def __init__(self) -> None:
        super().__init__()
        self.results = None

    def start(self):
        return [Fetch((MediaRequest(0, "http://media.test/cat.png", "image"),))]

    def feed(self, events):
        if self.results is None:
            self.results = list(events)
            if isinstance(events[0], MediaFetchFailed):
                self.finished = True
                return [StartResponse(400, ()), Body(events[0].message.encode()), EndResponse()]
            return super().start()
        return super().feed(events)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_a_fetch_is_done_by_the_injected_fetcher_and_fed_back_before_engine_work(backend):
    asked = []

    async def fetch_media(requests):
        asked.extend(requests)
        await anyio.sleep(0)  # a real fetch yields to the loop
        return [MediaFetched(r.key, b"png bytes", "image/png") for r in requests]

    app, engine = SpyApp(), InstantEngine()
    app.call = FetchingCall()
    shell = AsgiApp(app, {"m": engine}, fetch_media=fetch_media)
    sent = anyio.run(request, shell, [{"type": "http.request", "body": b"{}"}], backend=backend)
    assert asked == [MediaRequest(0, "http://media.test/cat.png", "image")]
    assert app.call.results == [MediaFetched(0, b"png bytes", "image/png")]
    assert sent[1]["body"] == b"abc"  # then the engine work ran as usual


@pytest.mark.parametrize("backend", RUNTIMES)
def test_without_a_fetcher_a_url_is_refused_with_what_to_do(backend):
    app, engine = SpyApp(), InstantEngine()
    app.call = FetchingCall()
    shell = AsgiApp(app, {"m": engine})
    sent = anyio.run(request, shell, [{"type": "http.request", "body": b"{}"}], backend=backend)
    assert sent[0]["status"] == 400
    assert sent[1]["body"] == NO_FETCHER_MESSAGE.encode()
    assert engine.submitted == []


class ComputingCall(SpyCall):
    """Its work waits for the event loop to do something: possible only off the loop."""

    def __init__(self, started: threading.Event, loop_ran: threading.Event) -> None:
        super().__init__()
        self.started = started
        self.loop_ran = loop_ran
        self.computed = None

    def start(self):
        def work() -> bool:
            self.started.set()
            return self.loop_ran.wait(timeout=10)

        return [Compute(work)]

    def feed(self, events):
        if self.computed is None:
            (self.computed,) = events
            return super().start()
        return super().feed(events)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_a_compute_runs_off_the_event_loop_and_is_fed_back(backend):
    started, loop_ran = threading.Event(), threading.Event()
    app, engine = SpyApp(), InstantEngine()
    app.call = ComputingCall(started, loop_ran)
    shell = AsgiApp(app, {"m": engine})

    async def main():
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(request, shell, [{"type": "http.request", "body": b"{}"}])
            await anyio.to_thread.run_sync(started.wait)  # the work is running...
            loop_ran.set()  # ...and the loop still runs this (it would not if the work held it)
        return app.call.computed

    computed = anyio.run(main, backend=backend)
    assert computed == Computed(True)  # the work saw the loop run while it waited
