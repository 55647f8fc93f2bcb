"""Engines behind runtime bridges, started once the server's event loop runs and stopped at shutdown.

The bridges need the running loop (asyncio) or trio token, so they are built in the ASGI lifespan
startup rather than at assembly time; `clients` is the live mapping the ASGI shell reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from protocol.engine_client import EngineClient


class Bridge(EngineClient, Protocol):
    """A runtime bridge (`runtime_asyncio.bridge` / `runtime_trio.bridge`) as the lifecycle drives it."""

    def start(self) -> None: ...

    async def aclose(self) -> None: ...


BridgeFactory = Callable[[object], Bridge]


class EngineLifecycle:
    """Starts each engine behind a bridge at lifespan startup and stops them all at shutdown."""

    def __init__(self, engines: Mapping[str, object], bridge_factory: BridgeFactory) -> None:
        self.engines = dict(engines)
        self.bridge_factory = bridge_factory
        self.clients: dict[str, EngineClient] = {}
        self._bridges: list[Bridge] = []

    async def startup(self) -> None:
        for name, engine in self.engines.items():
            bridge = self.bridge_factory(engine)
            bridge.start()
            self._bridges.append(bridge)
            self.clients[name] = bridge

    async def shutdown(self) -> None:
        self.clients.clear()
        while self._bridges:
            await self._bridges.pop().aclose()
