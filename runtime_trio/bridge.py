"""The trio side of the engine thread: an `EngineClient` that wakes trio once per engine step.

The engine calls `on_events` on its own thread after every step; that callback does exactly one
`TrioToken.run_sync_soon`, and trio then routes the step's events to the waiting requests'
sinks. Sinks therefore always run on trio's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

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


class TrioEngineBridge:
    """`protocol.engine_client.EngineClient` over an engine thread, for a trio run."""

    def __init__(self, engine: ThreadedEngine) -> None:
        self.engine = engine
        self._sinks: dict[str, EventSink] = {}
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        """Start the engine thread, delivering to the current trio run (call it from inside that run)."""
        self._token = trio.lowlevel.current_trio_token()
        self.engine.start(self._on_engine_step)

    async def aclose(self) -> None:
        """Stop the engine thread without blocking the loop while it winds down."""
        await trio.to_thread.run_sync(self.engine.shutdown)

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
        """Runs on the engine thread: one trio wake-up for the whole step."""
        assert self._token is not None
        try:
            self._token.run_sync_soon(self._dispatch, events)
        except trio.RunFinishedError:  # the run is over: the server is gone, nobody waits for these
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
