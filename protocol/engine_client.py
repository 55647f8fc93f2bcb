"""The runtime-side view of an engine, as the ASGI shell uses it.

Implemented by `runtime_asyncio.bridge` and `runtime_trio.bridge` around the engine thread (one
loop wake-up per engine step), and by the scripted engines of `tests/runtime/fakes.py` and
`fuzz/engine_driver.py`. Sinks are called on the event loop's thread, never on the engine thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from protocol.engine_api import Command, Event

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
