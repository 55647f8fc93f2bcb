"""The runtime-neutral ASGI shell: drives the Sans-IO core over ASGI, under asyncio or trio alike.

It is the only IO the protocol package does, and it stays runtime-neutral by using anyio alone:
the runtime packages provide the `EngineClient` bridges (which wake the loop once per engine step)
and hypercorn. One HTTP request is one `_Exchange`: read the body, `app.handle(...)`, then play the
call's outputs in order while engine events arrive, watching for the client going away.

Media URLs in a prompt are fetched by an injected `fetch_media` (the runtime's fetcher, with its
limits); the results go back to the call before it submits engine work. A call's `Compute` (decoding
media) runs on a worker thread, so one request's long decode does not stall the others.

It also owns the drain: `drain()` turns /health to 503 and refuses new work (through the status
it hands the core with each request), waits for the requests in flight, and ends those still
running at the deadline with a `Failed` event each, so the core closes their streams with an SSE
error frame.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread

from protocol.engine_api import Abort, Command, Encode, Event, Failed, Generate
from protocol.engine_client import EngineClient
from protocol.errors import ProtocolError
from protocol.media.fetch import FetchResult, MediaFetchFailed, MediaRequest
from protocol.outputs import (
    Body,
    Compute,
    Computed,
    EndResponse,
    Fetch,
    Output,
    StartResponse,
    Submit,
    compute_inline,
)
from protocol.state import SERVING, Health, ServerStatus

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds in-flight requests get to finish once a drain begins
CUT_GRACE_SECONDS = 5.0  # after the deadline: time for cut streams to send their last frame
SHUTDOWN_CUT_MESSAGE = "The server shut down before request {request_id} finished ({timeout:g} s drain timeout)."

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
LifespanHook = Callable[[], Awaitable[None]]
ResponseHook = Callable[[str, str, int, float], None]
FetchMedia = Callable[[Sequence[MediaRequest]], Awaitable[list[FetchResult]]]
NO_FETCHER_MESSAGE = "This server does not fetch media URLs; send the media inline as a data: URL."

_JSON_HEADERS = ((b"content-type", b"application/json"),)


class CallLike(Protocol):
    """The per-request state machine of the core (`protocol.calls.Call`), as the shell uses it."""

    model: str | None

    def start(self) -> list[Output]: ...

    def feed(self, events: Sequence[Event | FetchResult | Computed]) -> list[Output]: ...

    def disconnected(self) -> list[Command]: ...

    @property
    def finished(self) -> bool: ...


class CoreApp(Protocol):
    """The Sans-IO core (`protocol.app.App`), as the shell uses it."""

    def handle(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        status: ServerStatus = SERVING,
    ) -> CallLike: ...


class AsgiApp:
    """An ASGI 3 application serving `app` with the engines in `engines` (keyed by served model name).

    `engines` is read at request time, so a lifespan hook may fill it once the loop runs (the
    bridges need the running loop). `on_startup` hooks run in order at lifespan startup, and
    `on_shutdown` hooks at lifespan shutdown. `fetch_media` fetches the media URLs of prompts
    (None: such URLs are refused with a 400 naming the part).
    """

    def __init__(
        self,
        app: CoreApp,
        engines: Mapping[str, EngineClient],
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        on_startup: Sequence[LifespanHook] = (),
        on_shutdown: Sequence[LifespanHook] = (),
        on_response: ResponseHook | None = None,
        log_requests: bool = False,
        max_log_len: int | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        fetch_media: FetchMedia | None = None,
    ) -> None:
        self.app = app
        self.fetch_media = fetch_media
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        self._exchanges: set[_Exchange] = set()
        self._exchange_ended: anyio.Event | None = None  # set (and replaced) as exchanges end, while draining
        self._drain_scope: anyio.CancelScope | None = None
        self.log_requests = log_requests  # vLLM's --enable-log-requests
        self.max_log_len = max_log_len  # prompt token ids logged at most (None: all)
        self.on_response = on_response  # (method, path, status, seconds) once a response has ended
        self.engines = engines
        self.max_body_bytes = max_body_bytes
        self.on_startup = list(on_startup)
        self.on_shutdown = list(on_shutdown)

    @property
    def healthy(self) -> bool:
        return all(engine.healthy for engine in self.engines.values())

    @property
    def status(self) -> ServerStatus:
        """What the core is told with each request: health (drain first) and requests in flight."""
        if self.draining:
            health = Health.DRAINING
        else:
            health = Health.SERVING if self.healthy else Health.UNHEALTHY
        return ServerStatus(health, sum(1 for exchange in self._exchanges if exchange.request_ids))

    async def drain(self, timeout: float | None = None) -> None:
        """Stop taking work and let the requests in flight finish; end the rest at the deadline.

        From the first moment /health answers 503 and new requests get a 503 (a load balancer
        moves on); requests in flight get `timeout` seconds (default: `shutdown_timeout`). Those
        still running then fail with a 503: a stream ends with an SSE error frame. `cut_now()`
        (a second signal) skips the wait. Returns once no request is left (or, with a client that
        stopped reading, after a short grace).
        """
        timeout = self.shutdown_timeout if timeout is None else timeout
        self.draining = True
        logger.info("draining: %d request(s) in flight get %g s to finish", len(self._exchanges), timeout)
        with anyio.move_on_after(timeout) as self._drain_scope:
            await self._until_idle()
        if self._exchanges:
            logger.warning("shutdown timeout: ending %d request(s) still in flight", len(self._exchanges))
            for exchange in list(self._exchanges):
                exchange.cut(timeout)
            with anyio.move_on_after(CUT_GRACE_SECONDS):
                await self._until_idle()
            for exchange in list(self._exchanges):  # a client that stopped reading
                exchange.cancel()
        logger.info("drained")

    def cut_now(self) -> None:
        """End the drain's wait at once (a second SIGTERM/SIGINT)."""
        if self._drain_scope is not None:
            self._drain_scope.cancel()

    async def _until_idle(self) -> None:
        while self._exchanges:
            self._exchange_ended = anyio.Event()
            await self._exchange_ended.wait()

    def _ended(self, exchange: _Exchange) -> None:
        self._exchanges.discard(exchange)
        if self._exchange_ended is not None:
            self._exchange_ended.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            exchange = _Exchange(self, scope, receive, send)
            self._exchanges.add(exchange)
            try:
                await exchange.run()
            finally:
                self._ended(exchange)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if not await _run_hooks(self.on_startup, "startup", send):
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if await _run_hooks(self.on_shutdown, "shutdown", send):
                    await send({"type": "lifespan.shutdown.complete"})
                return


async def _run_hooks(hooks: Sequence[LifespanHook], phase: str, send: Send) -> bool:
    """Run lifespan hooks; a failure is reported to the server as `lifespan.<phase>.failed`."""
    try:
        for hook in hooks:
            await hook()
    except Exception as exc:
        logger.exception("lifespan %s failed", phase)
        await send({"type": f"lifespan.{phase}.failed", "message": f"{type(exc).__name__}: {exc}"})
        return False
    return True


class _EngineMissing(Exception):
    """The call names a model whose engine is not running (startup not done, or it failed)."""


class _Exchange:
    """One HTTP request/response, from the request body to the last byte or the client leaving."""

    def __init__(self, shell: AsgiApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.shell = shell
        self.scope = scope
        self.receive = receive
        self.send = send
        self.call: CallLike | None = None
        self.engine: EngineClient | None = None
        self.request_ids: list[str] = []
        self.response_started = False
        self.response_ended = False
        self.client_gone = False
        self.status: int | None = None  # sent in http.response.start
        self.events_in, self.events_out = anyio.create_memory_object_stream[Event](math.inf)
        self._scope = anyio.CancelScope()

    def cut(self, timeout: float) -> None:
        """End this exchange at the drain's deadline: its engine work is aborted and the call gets a
        503 `Failed` per request (a stream ends with an SSE error frame); without engine work, stop."""
        call, engine = self.call, self.engine
        if call is None or engine is None or not self.request_ids or call.finished:
            self.cancel()
            return
        engine.submit([Abort(request_id) for request_id in self.request_ids])
        try:
            for request_id in self.request_ids:
                message = SHUTDOWN_CUT_MESSAGE.format(request_id=request_id, timeout=timeout)
                self.events_in.send_nowait(Failed(request_id, 503, message))
        except anyio.ClosedResourceError:  # it is ending by itself
            pass

    def cancel(self) -> None:
        """Stop serving at once (the response, if started, is cut off)."""
        self._scope.cancel()

    async def run(self) -> None:
        started = anyio.current_time()
        try:
            with self._scope:
                await self._run()
        finally:
            hook = self.shell.on_response
            if hook is not None and self.status is not None:
                try:
                    hook(self.scope.get("method", ""), self.scope.get("path", ""), self.status, anyio.current_time() - started)
                except Exception:  # noqa: BLE001 - metrics must never break a response
                    logger.exception("the response hook failed")

    async def _run(self) -> None:
        try:
            body = await self._read_body()
            if body is None:
                return
            self.call = self.shell.app.handle(
                self.scope["method"],
                _target(self.scope),
                self.scope.get("headers", ()),
                body,
                status=self.shell.status,
            )
            await self._serve(self.call)
        except Exception as exc:
            cause = _sole_cause(exc)
            if isinstance(cause, _EngineMissing):
                await self._fail(ProtocolError(str(cause), 503))
            else:
                logger.exception(
                    "unexpected failure serving %s %s", self.scope.get("method"), self.scope.get("path")
                )
                await self._fail(ProtocolError("Internal server error", 500))
        finally:
            self._release()

    async def _read_body(self) -> bytes | None:
        """The whole request body, or None when the client left or the body is over the cap (413 sent)."""
        cap = self.shell.max_body_bytes
        declared = _content_length(self.scope.get("headers", ()))
        if declared is not None and declared > cap:
            await self._too_large(cap, drain=declared <= _DISCARD_LIMIT)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return None
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await self._too_large(cap)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, cap: int, *, drain: bool = True) -> None:
        """Answer 413 once the rest of the body is read, so the connection can serve the next request.

        Why read first: an HTTP/1.1 server closes a connection whose request body was not read to its
        end when the response completes; a 413 sent before that looks keep-alive to the client, which
        may then send its next request into a closing socket. A body past the drain bound gets the
        413 with `Connection: close` instead."""
        drained = drain and await self._discard_body()
        error = ProtocolError(f"Request body too large: the limit is {cap} bytes", 413)
        await self._respond_error(error, close=not drained)

    async def _discard_body(self) -> bool:
        """Read (and drop) what the client is still sending, up to a bound; True when it all arrived.

        Why: closing a connection with unread request bytes makes the kernel send a reset, and a
        client still writing its body then loses the 413."""
        left = _DISCARD_LIMIT
        while left > 0:
            message = await self.receive()
            if message["type"] != "http.request":
                return False
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False

    async def _serve(self, call: CallLike) -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._watch_disconnect, tasks.cancel_scope)
            await self._play(call.start())
            while not call.finished:
                if not self.request_ids:
                    raise RuntimeError("the call waits for engine events but submitted no engine work")
                batch = [await self.events_out.receive()]
                while True:  # everything already queued goes to the core in one feed
                    try:
                        batch.append(self.events_out.receive_nowait())
                    except anyio.WouldBlock:
                        break
                await self._play(call.feed(batch))
            tasks.cancel_scope.cancel()
        if not self.response_ended and not self.client_gone:
            raise RuntimeError("the call finished without ending its response")

    async def _watch_disconnect(self, scope: anyio.CancelScope) -> None:
        """Stop serving when the client goes away; `_release` then aborts the unfinished work."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        scope.cancel()

    async def _play(self, outputs: Sequence[Output]) -> None:
        for output in outputs:
            if isinstance(output, StartResponse):
                self.status = output.status
                await self.send(
                    {"type": "http.response.start", "status": output.status, "headers": list(output.headers)}
                )
                self.response_started = True
            elif isinstance(output, Body):
                if output.data:
                    await self.send({"type": "http.response.body", "body": output.data, "more_body": True})
            elif isinstance(output, EndResponse):
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                self.response_ended = True
            elif isinstance(output, Submit):
                self._submit(output.commands)
            elif isinstance(output, Fetch):
                await self._play(await self._fetch(output))
            elif isinstance(output, Compute):  # pure CPU work (decoding media): off the event loop
                assert self.call is not None
                computed = await anyio.to_thread.run_sync(compute_inline, output)
                await self._play(self.call.feed([computed]))
            else:
                raise TypeError(f"unknown output {output!r}")

    async def _fetch(self, fetch: Fetch) -> list[Output]:
        """Fetch a call's media and feed the results back; its next outputs (engine work or a 400)."""
        assert self.call is not None
        if self.shell.fetch_media is None:
            results: list[FetchResult] = [MediaFetchFailed(r.key, NO_FETCHER_MESSAGE) for r in fetch.requests]
        else:
            results = await self.shell.fetch_media(fetch.requests)
        return self.call.feed(results)

    def _submit(self, commands: Sequence[Command]) -> None:
        engine = self._engine()
        if self.shell.log_requests:
            log_commands(commands, self.shell.max_log_len)
        for command in commands:
            if not isinstance(command, Abort) and command.request_id not in self.request_ids:
                engine.subscribe(command.request_id, self.events_in.send_nowait)
                self.request_ids.append(command.request_id)
        engine.submit(commands)

    def _engine(self) -> EngineClient:
        if self.engine is None:
            model = self.call.model if self.call is not None else None
            engine = self.shell.engines.get(model) if model is not None else None
            if engine is None:
                raise _EngineMissing(f"The engine for model {model!r} is not running")
            self.engine = engine
        return self.engine

    async def _fail(self, error: ProtocolError) -> None:
        """Answer an unexpected failure as well as the response's state still allows."""
        try:
            if not self.response_started:
                await self._respond_error(error)
            elif not self.response_ended:
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                self.response_ended = True
        except Exception:
            logger.debug("could not report a failure to the client", exc_info=True)

    async def _respond_error(self, error: ProtocolError, *, close: bool = False) -> None:
        headers = list(_JSON_HEADERS)
        if close and self.scope.get("http_version", "1.1").startswith("1"):
            headers.append((b"connection", b"close"))  # HTTP/2 forbids the header; it resets instead
        self.status = error.status
        await self.send({"type": "http.response.start", "status": error.status, "headers": headers})
        self.response_started = True
        await self.send({"type": "http.response.body", "body": error.to_json(), "more_body": False})
        self.response_ended = True

    def _release(self) -> None:
        """Abort engine work the call did not finish (client gone, failure, cancellation); unsubscribe."""
        try:
            if self.engine is not None and self.call is not None and not self.call.finished:
                aborts = self._aborts()
                if aborts:
                    if self.shell.log_requests:  # a client leaving is the usual abort: log it as vLLM does
                        log_commands(aborts, self.shell.max_log_len)
                    self.engine.submit(aborts)
        finally:
            if self.engine is not None:
                for request_id in self.request_ids:
                    self.engine.unsubscribe(request_id)
            self.events_in.close()
            self.events_out.close()

    def _aborts(self) -> list[Command]:
        try:
            return list(self.call.disconnected()) if self.call is not None else []
        except Exception:
            logger.exception("the call failed to list its aborts; aborting all its requests")
            return [Abort(request_id) for request_id in self.request_ids]


def _sole_cause(exc: BaseException) -> BaseException:
    """The one exception inside (nested) task-group exception groups, or `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def log_commands(commands: Sequence[Command], max_log_len: int | None) -> None:
    """vLLM's request log line: id, prompt token ids (the first `max_log_len`) and parameters."""
    for command in commands:
        if isinstance(command, Generate | Encode):
            ids = command.prompt_token_ids if max_log_len is None else command.prompt_token_ids[:max_log_len]
            more = len(command.prompt_token_ids) - len(ids)
            logger.info(
                "Received request %s: prompt_token_ids: %s%s, params: %s",
                command.request_id,
                list(ids),
                f" (+{more} more)" if more else "",
                command.params,
            )
        elif isinstance(command, Abort):
            logger.info("Aborted request %s%s", command.request_id, "" if command.index is None else f" (sample {command.index})")


def _target(scope: Scope) -> str:
    """The request target as the core routes it: the path, plus the query string when there is one."""
    query = scope.get("query_string", b"")
    path = scope["path"]
    return f"{path}?{query.decode('latin-1')}" if query else path


_DISCARD_LIMIT = 64 << 20  # bytes of an oversized body read and dropped after its 413


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
