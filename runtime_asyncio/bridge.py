"""The asyncio side of the engine thread: an `EngineClient` that wakes the loop once per engine step.

The engine calls `on_events` on its own thread after every step; that callback does exactly one
`loop.call_soon_threadsafe`, and the loop then routes the step's events to the waiting requests'
sinks. Sinks therefore always run on the loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from protocol.engine_api import Command, Event
from protocol.engine_client import EventSink

logger = logging.getLogger(__name__)


class ThreadedEngine(Protocol):
    """What the bridge needs from `engine.engine.Engine` (tests use a fake with the same shape)."""

    def start(self, on_events: Callable[[list[Event]], None]) -> None: ...

    def submit(self, commands: Sequence[Command]) -> None: ...

    def shutdown(self) -> None: ...

    @property
    def healthy(self) -> bool: ...


class AsyncioEngineBridge:
    """`protocol.engine_client.EngineClient` over an engine thread, for an asyncio loop."""

    def __init__(self, engine: ThreadedEngine) -> None:
        self.engine = engine
        self._sinks: dict[str, EventSink] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the engine thread, delivering to the running loop (call it from that loop)."""
        self._loop = asyncio.get_running_loop()
        self.engine.start(self._on_engine_step)

    async def aclose(self) -> None:
        """Stop the engine thread without blocking the loop while it winds down."""
        await asyncio.to_thread(self.engine.shutdown)

    def submit(self, commands: Sequence[Command]) -> None:
        self.engine.submit(commands)

    def subscribe(self, request_id: str, sink: EventSink) -> None:
        self._sinks[request_id] = sink

    def unsubscribe(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)

    @property
    def healthy(self) -> bool:
        return self.engine.healthy

    def _on_engine_step(self, events: list[Event]) -> None:
        """Runs on the engine thread: one loop wake-up for the whole step."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._dispatch, events)
        except RuntimeError:  # the loop is closed: the server is gone, nobody waits for these
            pass

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            sink = self._sinks.get(event.request_id)
            if sink is None:
                continue  # the request already ended (finished, aborted or its client left)
            try:
                sink(event)
            except Exception:
                logger.exception("event sink for %s failed", event.request_id)
