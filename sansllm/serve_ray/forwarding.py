"""HTTP requests carried from the ingress to an engine replica and played through its ASGI app.

The ingress reads a request whole (bodies are small next to the work they ask for), names its
prompt prefix for the router (`ForwardedRequest.prefix_keys`), and sends it to a replica through a
Ray deployment handle; the replica plays it through the same `protocol.asgi.AsgiApp` that `sansllm
serve` runs, and streams back the ASGI messages the app sends, in batches (whatever the app sent
while the last batch travelled), so a stream costs one Ray round trip per engine step at most.

No Ray here: the ingress side takes the call as a function and the "replica went away" test as a
predicate, so both sides are tested without a cluster (tests/runtime/test_ray_forwarding.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from protocol.errors import ProtocolError
from protocol.sse import DONE_FRAME, error_frame
from sansllm.prefix_routing import PrefixAffinity, prompt_text

logger = logging.getLogger(__name__)

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiCallable = Callable[[Scope, Receive, Send], Awaitable[None]]

REPLICA_HEADER = b"x-sansllm-replica"  # which engine replica answered (debugging, tests)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer"}


@dataclass
class ForwardedRequest:
    """One HTTP request as the ingress received it, plus its routing keys."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    root_path: str = ""
    prefix_keys: list[bytes] = field(default_factory=list)  # PrefixAffinity keys of the prompt

    def scope(self) -> Scope:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode("utf-8", "surrogateescape"),
            "query_string": self.query_string,
            "root_path": self.root_path,
            "headers": list(self.headers),
            "client": self.client,
            "server": None,
        }


# ---------------------------------------------------------------- replica side


async def play_forwarded(
    app: AsgiCallable, request: ForwardedRequest, extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> AsyncIterator[list[Message]]:
    """Run `request` through `app`, yielding the ASGI messages it sends in batches.

    Closing the generator early (the ingress's client left, or Ray cancelled the call) tells the
    app the client disconnected, so the engine work is aborted, and waits for the app to finish.
    `extra_headers` are added to the response's start.
    """
    outbox: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and extra_headers:
            message = {**message, "headers": [*message.get("headers", ()), *extra_headers]}
        outbox.put_nowait(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            outbox.put_nowait(None)

    task = asyncio.ensure_future(run())
    finished = False
    try:
        while not finished:
            batch: list[Message] = []
            message = await outbox.get()
            while True:
                if message is None:
                    finished = True
                    break
                batch.append(message)
                if outbox.empty():
                    break
                message = outbox.get_nowait()
            if batch:
                yield batch
    finally:
        if not task.done():
            gone.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.error("the app failed on %s %s", request.method, request.path, exc_info=task.exception())


# ---------------------------------------------------------------- ingress side

CallReplica = Callable[[ForwardedRequest], AsyncIterator[list[Message]]]


class Relay:
    """The ingress's ASGI app: reads each request, adds its routing keys, sends it to a replica
    (`call`) and relays the replica's response.

    A request whose replica went away (`replica_gone(exc)`) before anything of the response
    reached the client is sent again, up to `retries` times, so a killed or restarted replica
    loses no request that had not started; a stream cut after its first bytes ends with an SSE
    error frame and `[DONE]`, as the server itself ends a stream it cannot finish.
    """

    def __init__(
        self,
        call: CallReplica,
        replica_gone: Callable[[BaseException], bool],
        *,
        affinity: PrefixAffinity | None = None,
        max_body_bytes: int = 64 << 20,
        retries: int = 3,
    ) -> None:
        self.call = call
        self.replica_gone = replica_gone
        self.affinity = affinity  # only its key function is used here; the router owns the memory
        self.max_body_bytes = max_body_bytes
        self.retries = retries
        self.resent = 0  # requests sent again after their replica went away
        self.in_flight = 0  # requests forwarded and not yet answered in full

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1003})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            await _send_error(send, 413, f"The request body is larger than {self.max_body_bytes} bytes.")
            return
        request = ForwardedRequest(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b""),
            headers=[(name, value) for name, value in scope.get("headers", ()) if name.lower() not in _HOP_BY_HOP],
            body=body,
            client=tuple(scope["client"]) if scope.get("client") else None,
            root_path=scope.get("root_path", ""),
            prefix_keys=self._keys(scope, body),
        )
        self.in_flight += 1
        try:
            await self._forward(request, send)
        finally:
            self.in_flight -= 1

    async def _forward(self, request: ForwardedRequest, send: Send) -> None:
        started = streaming = False
        for attempt in range(self.retries + 1):
            try:
                async for batch in self.call(request):
                    for message in batch:
                        if message["type"] == "http.response.start":
                            streaming = _is_event_stream(message)
                        await send(message)
                        started = True
                return
            except Exception as exc:
                if not self.replica_gone(exc):
                    raise
                if not started and attempt < self.retries:
                    self.resent += 1
                    logger.warning("replica went away before answering %s %s: sending it again (%s)",
                                   request.method, request.path, type(exc).__name__)  # fmt: skip
                    continue
                logger.error("replica went away during %s %s: %s", request.method, request.path, exc)
                await _end_broken(send, started=started, streaming=streaming)
                return

    def _keys(self, scope: Scope, body: bytes) -> list[bytes]:
        if self.affinity is None or scope["method"] != "POST" or not body.startswith(b"{"):
            return []
        try:
            decoded = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return []  # the replica answers the 400
        if not isinstance(decoded, dict):
            return []
        # the model (or LoRA adapter) first: each has a prefix cache of its own in the engine
        model = decoded.get("model")
        return self.affinity.keys(f"{model if isinstance(model, str) else ''}\x00{prompt_text(decoded)}")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None past `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _is_event_stream(start: Message) -> bool:
    return any(
        name.lower() == b"content-type" and value.startswith(b"text/event-stream")
        for name, value in start.get("headers", ())
    )


async def _send_error(send: Send, status: int, message: str) -> None:
    body = ProtocolError(message, status).to_json()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


REPLICA_LOST = "The replica serving this request stopped; the request was not completed. Send it again."


async def _end_broken(send: Send, *, started: bool, streaming: bool) -> None:
    """End a response whose replica went away: a 503 if nothing was sent yet, an SSE error frame
    and `[DONE]` in a stream, else just the end of the body (the client sees it cut short)."""
    if not started:
        await _send_error(send, 503, REPLICA_LOST)
        return
    tail = b""
    if streaming:
        tail = error_frame(ProtocolError(REPLICA_LOST, 503)) + DONE_FRAME
    await send({"type": "http.response.body", "body": tail, "more_body": False})


class Lifespan:
    """Drives an ASGI app's lifespan (startup, later shutdown) where no server does: an engine
    replica behind the ingress is called through `play_forwarded`, not by an ASGI server."""

    def __init__(self, app: AsgiCallable) -> None:
        self.app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        self._task = asyncio.ensure_future(self.app({"type": "lifespan"}, self._inbox.get, self._send))
        await self._step("startup")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._step("shutdown")
        await self._task

    async def _send(self, message: Message) -> None:
        self._outbox.put_nowait(message)

    async def _step(self, phase: str) -> None:
        self._inbox.put_nowait({"type": f"lifespan.{phase}"})
        answer = await self._outbox.get()
        if answer["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"ASGI lifespan {phase} failed: {answer.get('message', answer['type'])}")
