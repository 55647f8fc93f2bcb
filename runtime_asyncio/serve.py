"""Serve an ASGI app with hypercorn on asyncio, shutting down gracefully on SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable

import hypercorn.asyncio
from hypercorn.config import Config

from protocol.asgi import AsgiApp

ShutdownTrigger = Callable[[], Awaitable[None]]

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve(asgi_app: AsgiApp, config: Config, shutdown_trigger: ShutdownTrigger | None = None) -> None:
    """Serve until `shutdown_trigger` returns (default: the first SIGINT/SIGTERM), then drain.

    In-flight requests get `config.graceful_timeout` seconds to finish; the app's lifespan
    shutdown (which stops the engines) runs after that. A second signal stops at once.
    """
    if shutdown_trigger is None:
        shutdown_trigger = _on_signal
    await hypercorn.asyncio.serve(asgi_app, config, shutdown_trigger=shutdown_trigger, mode="asgi")


def run(asgi_app: AsgiApp, config: Config, shutdown_trigger: ShutdownTrigger | None = None) -> None:
    """Run `serve` on a fresh asyncio loop (the blocking entry point of the CLI)."""
    asyncio.run(serve(asgi_app, config, shutdown_trigger))


async def _on_signal() -> None:
    """Return at the first shutdown signal; wait forever off the main thread (no signals there)."""
    stop = asyncio.Event()
    if threading.current_thread() is not threading.main_thread():
        await stop.wait()
    loop = asyncio.get_running_loop()
    for signum in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(signum)
