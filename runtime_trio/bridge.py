"""The trio side of the engine thread: an `EngineClient` that wakes trio once per engine step.

The engine calls `on_events` on its own thread after every step; that callback does exactly one
`TrioToken.run_sync_soon`, and trio then routes the step's events to the waiting requests'
sinks. Sinks therefore always run on trio's thread.
"""

from __future__ import annotations

import trio

from protocol.engine_api import Event
from protocol.engine_client import EventRouter, ThreadedEngine


class TrioEngineBridge(EventRouter):
    """`protocol.engine_client.EngineClient` over an engine thread, for a trio run."""

    def __init__(self, engine: ThreadedEngine) -> None:
        super().__init__(engine)
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        """Start the engine thread, delivering to the current trio run (call it from inside that run)."""
        self._token = trio.lowlevel.current_trio_token()
        self.engine.start(self._on_engine_step)

    async def aclose(self) -> None:
        """Stop the engine thread without blocking the loop while it winds down."""
        await trio.to_thread.run_sync(self.engine.shutdown)

    def _on_engine_step(self, events: list[Event]) -> None:
        """Runs on the engine thread: one trio wake-up for the whole step."""
        assert self._token is not None
        try:
            self._token.run_sync_soon(self._dispatch, events)
        except trio.RunFinishedError:  # the run is over: the server is gone, nobody waits for these
            pass
