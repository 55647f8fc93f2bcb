"""Run a server in a background thread on an ephemeral port, under asyncio or trio.

The listening socket is bound before the thread starts (as `sansllm.launch` does), so clients can
connect at once; readiness is the ASGI lifespan startup having completed, signalled by a hook.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import anyio.to_thread
from hypercorn.config import Config

import runtime_asyncio.serve
import runtime_trio.serve
from protocol.asgi import AsgiApp
from runtime_asyncio.bridge import AsyncioEngineBridge
from runtime_trio.bridge import TrioEngineBridge
from sansllm.lifecycle import EngineLifecycle
from sansllm.listen import bind_early

RUNTIMES = ("asyncio", "trio")
BRIDGES = {"asyncio": AsyncioEngineBridge, "trio": TrioEngineBridge}
_RUNNERS = {"asyncio": runtime_asyncio.serve.run, "trio": runtime_trio.serve.run}
STARTUP_TIMEOUT_S = 60.0


def shell_over(app, engines: dict, runtime: str, **kwargs) -> AsgiApp:
    """An `AsgiApp` over `app` whose engines start behind `runtime`'s bridge at lifespan startup."""
    lifecycle = EngineLifecycle(engines, BRIDGES[runtime])
    return AsgiApp(
        app, lifecycle.clients, on_startup=[lifecycle.startup], on_shutdown=[lifecycle.shutdown], **kwargs
    )


class ServerThread:
    """`with ServerThread(asgi_app, "trio") as server:` serves on `server.url` until the block ends."""

    def __init__(
        self,
        asgi_app: AsgiApp,
        runtime: str,
        *,
        tls_pem: Path | None = None,
        http2: bool = True,
        configure: Callable[[Config], None] | None = None,
    ) -> None:
        self.asgi_app = asgi_app
        self.runtime = runtime
        self.config = Config()
        self.config.bind = ["127.0.0.1:0"]
        self.config.graceful_timeout = 2
        self.config.alpn_protocols = ["h2", "http/1.1"] if http2 else ["http/1.1"]
        if tls_pem is not None:
            self.config.certfile = self.config.keyfile = str(tls_pem)
        if configure is not None:
            configure(self.config)
        (address,) = bind_early(self.config)
        scheme = "https" if tls_pem is not None else "http"
        # `configure` may bind a Unix socket instead (`unix:PATH`): clients then connect through
        # `uds` (httpx.HTTPTransport(uds=...)) and the URL's host is only a name
        self.uds: str | None = address.removeprefix("unix:") if address.startswith("unix:") else None
        self.port = 0 if self.uds is not None else int(address.rsplit(":", 1)[1])
        self.url = f"{scheme}://localhost" if self.uds is not None else f"{scheme}://127.0.0.1:{self.port}"
        self._started = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"server-{runtime}", daemon=True)

    def __enter__(self) -> ServerThread:
        async def mark_started() -> None:
            self._started.set()

        self.asgi_app.on_startup.append(mark_started)
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT_S):
            self.__exit__(None, None, None)
            raise RuntimeError("the server did not start")
        if self._error is not None:
            self._thread.join(timeout=30)
            raise self._error
        return self

    def begin_shutdown(self) -> None:
        """Start what SIGTERM starts (the drain) without waiting for the server to stop."""
        self._stop.set()

    def wait_stopped(self, timeout: float = 30) -> bool:
        """Whether the server stopped (its thread ended) within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            raise RuntimeError("the server did not stop")
        if self._error is not None:
            raise self._error

    def _serve(self) -> None:
        async def until_stopped() -> None:
            await anyio.to_thread.run_sync(self._stop.wait)

        try:
            _RUNNERS[self.runtime](self.asgi_app, self.config, until_stopped)
        except BaseException as exc:  # reported by __exit__ in the test's thread
            self._error = exc
            self._started.set()


def client_ssl_context(ca) -> ssl.SSLContext:
    """A client context trusting the test CA (a `trustme.CA`)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
