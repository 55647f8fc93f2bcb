"""Serve an ASGI app with hypercorn on asyncio, draining on SIGINT or SIGTERM."""

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

    The drain (`AsgiApp.drain`) runs while the sockets still accept: /health answers 503, new
    requests get a 503, in-flight ones get `asgi_app.shutdown_timeout` seconds. A second signal
    ends the wait. Then hypercorn closes the connections and the lifespan shutdown stops the engines.
    """

    async def drain_then_stop() -> None:
        if shutdown_trigger is not None:
            await shutdown_trigger()
            if isinstance(asgi_app, AsgiApp):  # tests may serve a bare ASGI callable
                await asgi_app.drain()
        else:
            await _drain_on_signal(asgi_app)

    await hypercorn.asyncio.serve(asgi_app, config, shutdown_trigger=drain_then_stop, mode="asgi")


def run(asgi_app: AsgiApp, config: Config, shutdown_trigger: ShutdownTrigger | None = None) -> None:
    """Run `serve` on a fresh asyncio loop (the blocking entry point of the CLI)."""
    asyncio.run(serve(asgi_app, config, shutdown_trigger))


async def _drain_on_signal(asgi_app: AsgiApp) -> None:
    """Drain at the first shutdown signal (a second one cuts the wait short); off the main thread,
    where no signal arrives, wait forever."""
    first = asyncio.Event()
    if threading.current_thread() is not threading.main_thread():
        await first.wait()

    def on_signal() -> None:
        if first.is_set():
            asgi_app.cut_now()
        first.set()

    loop = asyncio.get_running_loop()
    for signum in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    try:
        await first.wait()
        await asgi_app.drain()
    finally:
        for signum in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(signum)
