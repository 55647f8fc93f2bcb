"""The runtime-side view of an engine, as the ASGI shell uses it.

Implemented by `runtime_asyncio.bridge` and `runtime_trio.bridge` around the engine thread (one
loop wake-up per engine step), and by the scripted engines of `tests/runtime/fakes.py` and
`fuzz/engine_driver.py`. Sinks are called on the event loop's thread, never on the engine thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from protocol.engine_api import Command, Event

logger = logging.getLogger(__name__)

EventSink = Callable[[Event], None]


class EngineClient(Protocol):
    def submit(self, commands: Sequence[Command]) -> None:
        """Hand commands to the engine; returns at once (thread-safe enqueue)."""

    def subscribe(self, request_id: str, sink: EventSink) -> None:
        """Route the events of `request_id` to `sink` (register before submitting)."""

    def unsubscribe(self, request_id: str) -> None: ...

    @property
    def healthy(self) -> bool:
        """False once the engine thread has died; /health then answers 503."""


class ThreadedEngine(Protocol):
    """What a runtime bridge needs from `engine.engine.Engine` (tests use fakes of the same shape)."""

    def start(self, on_events: Callable[[list[Event]], None]) -> None: ...

    def submit(self, commands: Sequence[Command]) -> None: ...

    def shutdown(self) -> None: ...

    @property
    def healthy(self) -> bool: ...


class EventRouter:
    """The runtime-neutral half of a bridge: an `EngineClient` that routes a step's events to sinks.

    `runtime_asyncio.bridge` and `runtime_trio.bridge` subclass it and add only how the engine
    thread wakes their loop (which then calls `_dispatch` on the loop's thread).
    """

    def __init__(self, engine: ThreadedEngine) -> None:
        self.engine = engine
        self._sinks: dict[str, EventSink] = {}

    def submit(self, commands: Sequence[Command]) -> None:
        self.engine.submit(commands)

    def subscribe(self, request_id: str, sink: EventSink) -> None:
        self._sinks[request_id] = sink

    def unsubscribe(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)

    @property
    def healthy(self) -> bool:
        return self.engine.healthy

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            sink = self._sinks.get(event.request_id)
            if sink is None:
                continue  # the request already ended (finished, aborted or its client left)
            try:
                sink(event)
            except Exception:
                logger.exception("event sink for %s failed", event.request_id)
