"""The asyncio side of the engine thread: an `EngineClient` that wakes the loop once per engine step.

The engine calls `on_events` on its own thread after every step; that callback does exactly one
`loop.call_soon_threadsafe`, and the loop then routes the step's events to the waiting requests'
sinks. Sinks therefore always run on the loop's thread.
"""

from __future__ import annotations

import asyncio

from protocol.engine_api import Event
from protocol.engine_client import EventRouter, ThreadedEngine


class AsyncioEngineBridge(EventRouter):
    """`protocol.engine_client.EngineClient` over an engine thread, for an asyncio loop."""

    def __init__(self, engine: ThreadedEngine) -> None:
        super().__init__(engine)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start the engine thread, delivering to the running loop (call it from that loop)."""
        self._loop = asyncio.get_running_loop()
        self.engine.start(self._on_engine_step)

    async def aclose(self) -> None:
        """Stop the engine thread without blocking the loop while it winds down."""
        await asyncio.to_thread(self.engine.shutdown)

    def _on_engine_step(self, events: list[Event]) -> None:
        """Runs on the engine thread: one loop wake-up for the whole step."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._dispatch, events)
        except RuntimeError:  # the loop is closed: the server is gone, nobody waits for these
            pass
