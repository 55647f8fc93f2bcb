"""The served stack in one process: HTTP/1.1 bytes through h11 into `AsgiApp` over the real core.

`serve_bytes(stack, data, ...)` plays one client connection. It parses what the client sent with a
server-side h11 connection, as hypercorn does (same scope, method upper-cased, 100-continue, a
400/431/501 with `Connection: close` on a protocol error, keep-alive only when both sides are
done), runs `AsgiApp` for each request, and writes its ASGI messages back through h11, which
refuses a malformed response. Nothing opens a socket or starts a thread: the engine is
`ServedEngine`, an `EngineClient` on the event loop that steps the fuzz fake engine
(`fuzz.engine_driver.EngineSession`), so requests get the same tokens, pooled vectors, injected
`Failed` events and client disconnects as in the Sans-IO properties. It runs under asyncio or trio.
Media URLs in prompts go to `AsgiApp`'s `fetch_media`, here a fake async fetcher that answers from
the request's engine script as the Sans-IO driver does (`EngineSession.fetch`): no network.

Every connection runs under `anyio.fail_after(HANG_SECONDS)`: a request that never finishes is a
finding reported with the engine's state, not a stuck test. `check_response` is what every
response must satisfy whatever was sent.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.lowlevel
import h11

from fuzz import media_samples
from fuzz.engine_driver import DriverError, EngineScript, EngineSession, FakeEngine
from fuzz.oracle import (
    OracleError,
    check_error_payload,
    check_media_commands,
    expect,
    media_parts,
    named_part,
    strict_json,
    traceback_leak,
)
from protocol import App, AppConfig
from protocol.asgi import AsgiApp, CoreApp
from protocol.engine_api import Command, Encode, Event, Generate
from protocol.engine_client import EventSink
from protocol.media.fetch import FetchResult, MediaFetchFailed, MediaRequest
from protocol.media.spec import MultimodalSpec
from protocol.model import ServedModel
from protocol.testing import ByteTokenizer

HANG_SECONDS = 10.0  # far above any exchange here (milliseconds); only a stuck one reaches it
MAX_INCOMPLETE_EVENT = 16 * 1024  # hypercorn's h11_max_incomplete_size


class ServedEngine:
    """An `EngineClient` on the event loop: the fake engine steps while a call has work running.

    `begin(script)` starts a call's engine session (one request at a time per connection, as
    HTTP/1.1 serves them). `run()` is the engine loop; it also plays the client leaving at the
    script's `disconnect_step`, through `leave`. Runtime-contract violations (`DriverError`) are
    kept in `errors` rather than raised into the shell, which would turn them into a 500.
    """

    def __init__(self, engine: FakeEngine, leave: Callable[[], None]) -> None:
        self.engine = engine
        self.leave = leave
        self.session: EngineSession | None = None
        self.errors: list[DriverError] = []
        self.healthy = True
        self._sinks: dict[str, EventSink] = {}
        self._work = anyio.Event()
        self._left = False

    def begin(self, script: EngineScript) -> EngineSession:
        self.session = EngineSession(self.engine, script)
        return self.session

    def submit(self, commands: Sequence[Command]) -> None:
        if self.session is None:
            self.errors.append(DriverError(f"commands submitted outside a request: {commands!r}"))
            return
        try:
            self.session.submit(commands)
        except DriverError as error:
            self.errors.append(error)
        self._work.set()

    async def fetch_media(self, requests: Sequence[MediaRequest]) -> list[FetchResult]:
        """`AsgiApp`'s fetcher: the current request's script answers, after one scheduling point
        (a real fetch awaits the network)."""
        await anyio.lowlevel.checkpoint()
        if self.session is None:
            self.errors.append(DriverError(f"media fetched outside a request: {requests!r}"))
            return [MediaFetchFailed(request.key, "no request") for request in requests]
        try:
            return self.session.fetch(requests)
        except DriverError as error:
            self.errors.append(error)
            return [MediaFetchFailed(request.key, "refused by the fake fetcher") for request in requests]

    def subscribe(self, request_id: str, sink: EventSink) -> None:
        self._sinks[request_id] = sink

    def unsubscribe(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)

    async def run(self) -> None:
        """Step the current session while it has work; one scheduling point between steps."""
        while True:
            await self._work.wait()
            self._work = anyio.Event()
            while (session := self.session) is not None and session.busy and not self._left:
                leave_at = session.script.disconnect_step
                if leave_at is not None and session.steps >= leave_at:
                    self._left = True
                    self.leave()
                    break
                self._dispatch(session.step())
                await anyio.lowlevel.checkpoint()

    def _dispatch(self, events: Sequence[Event]) -> None:
        for event in events:
            sink = self._sinks.get(event.request_id)
            if sink is not None:  # else the request already ended, as with the real bridges
                sink(event)


@dataclass(frozen=True)
class Server:
    """One server configuration: the core and the shell's body cap. Its models share one fake
    engine, so they share a vocabulary (a vision model's holds `<image>`: serve it alone)."""

    name: str
    app: CoreApp
    models: tuple[ServedModel, ...]
    max_body_bytes: int = 32 * 1024 * 1024

    @property
    def multimodal(self) -> MultimodalSpec | None:
        """The media the served model takes (None: text only)."""
        return next((model.multimodal for model in self.models if model.multimodal is not None), None)


class FixedMetrics:
    """The server state the core asks for `/metrics` (a running server exposes its registry)."""

    def metrics(self) -> bytes:
        return b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"


def make_server(
    name: str, models: Sequence[ServedModel], config: AppConfig | None = None, **shell: Any
) -> Server:
    """A server of `models` with a fixed clock, a fresh id counter and a `/metrics`."""
    ids = itertools.count(1)
    app = App(
        config or AppConfig(),
        list(models),
        clock=lambda: 1_700_000_000.0,
        new_id=lambda: f"sv{next(ids)}",
        state=FixedMetrics(),
    )
    return Server(name, app, tuple(models), **shell)


@dataclass
class Exchange:
    """One request the app served (or h11 refused), and what went back."""

    method: str = ""  # as the app sees it (upper-cased, as hypercorn does)
    wire_method: bytes = b""  # as the client sent it
    target: bytes = b""
    http_version: bytes = b"1.1"
    request_bytes: bytes = b""  # the request's head and body as h11 parsed them (for leak checks)
    request_body: bytes = b""  # the body alone
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    client_left: bool = False  # the client closed mid-body, or left at the script's disconnect_step
    engine_failure: int | None = None  # the status of a `Failed` the engine injected
    protocol_error: str | None = None  # h11 refused the request: the driver answered (no app call)
    problems: list[str] = field(default_factory=list)  # ASGI or HTTP misuse by the app
    commands: list[Generate | Encode] = field(default_factory=list)  # the engine work it submitted
    fetches: list[MediaRequest] = field(default_factory=list)  # the media URLs it had fetched
    fetched: list[FetchResult] = field(default_factory=list)  # and what the fetcher answered

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass
class Connection:
    """What happened on one client connection."""

    exchanges: list[Exchange] = field(default_factory=list)
    wire: bytearray = field(default_factory=bytearray)  # everything the server wrote
    closed_by: str = "eof"  # eof | close (MUST_CLOSE or unread body) | protocol-error | client-left
    engine_errors: list[DriverError] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)  # engine work left running after a request

    @property
    def app_exchanges(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.protocol_error is None]


class _Client:
    """The client's side of the connection: bytes in the order written, then EOF."""

    def __init__(self, data: bytes, splits: Sequence[int]) -> None:
        cuts = sorted({cut for cut in splits if 0 < cut < len(data)})
        bounds = [0, *cuts, len(data)]
        self.writes = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def next_write(self) -> bytes:
        return self.writes.pop(0) if self.writes else b""


def _suppress_body(method: bytes, status: int) -> bool:
    """hypercorn's rule: no body bytes for HEAD, 1xx, 204 and 304 (h11 would refuse them).

    `method` as sent: hypercorn tests the upper-cased one, so its h11 refuses the response to a
    `head` request (h11 frames it as a body); that is hypercorn's, not the app's, so not tested."""
    return method == b"HEAD" or 100 <= status < 200 or status in (204, 304)


class _Served:
    """One connection being served: the h11 state machine, the app, the engine and the records."""

    def __init__(self, asgi: AsgiApp, engine: ServedEngine, data: bytes, splits: Sequence[int]) -> None:
        self.asgi = asgi
        self.engine = engine
        self.client = _Client(data, splits)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_INCOMPLETE_EVENT)
        self.result = Connection()
        self.left = anyio.Event()  # the client went away mid-request

    def next_event(self) -> Any:
        """The next h11 event, reading more of what the client sent as needed (EOF at the end)."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.their_state is h11.CLOSED:
                return h11.ConnectionClosed()
            self.h11.receive_data(self.client.next_write())

    def write(self, event: Any) -> None:
        self.result.wire += self.h11.send(event) or b""

    def refuse(self, error: h11.RemoteProtocolError, exchange: Exchange | None) -> None:
        """As hypercorn: answer `error_status_hint` with `Connection: close` if nothing was sent yet."""
        self.result.closed_by = "protocol-error"
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        record = exchange if exchange is not None and exchange.status is None else Exchange()
        if record is not exchange:
            self.result.exchanges.append(record)
        record.protocol_error = str(error)
        record.status = error.error_status_hint
        record.headers = [(b"content-length", b"0"), (b"connection", b"close")]
        try:
            self.write(h11.Response(status_code=record.status, headers=record.headers))
            self.write(h11.EndOfMessage())
            record.ended = True
        except h11.LocalProtocolError as exc:
            record.problems.append(f"could not send the {record.status}: {exc}")

    async def serve(self, scripts: Sequence[EngineScript]) -> Connection:
        for index in itertools.count():
            try:
                event = self.next_event()
            except h11.RemoteProtocolError as error:
                self.refuse(error, None)
                break
            if isinstance(event, h11.ConnectionClosed):
                break
            if not isinstance(event, h11.Request):
                self.result.closed_by = f"unexpected {type(event).__name__}"
                break
            exchange = Exchange(
                method=event.method.decode("ascii").upper(),
                wire_method=bytes(event.method),
                target=event.target,
                http_version=event.http_version,
                request_bytes=event.target + b"".join(n + b": " + v + b"\n" for n, v in event.headers),
            )
            self.result.exchanges.append(exchange)
            session = self.engine.begin(scripts[index % len(scripts)])
            await self.exchange(event, exchange)
            transcript = session.transcript
            failed = transcript.failed
            exchange.engine_failure = failed.status if failed is not None else None
            exchange.commands = [*transcript.generates, *transcript.encodes]
            exchange.fetches, exchange.fetched = list(transcript.fetches), list(transcript.fetched)
            self.result.leaks += session.leaked()
            if self.result.closed_by != "eof":
                break
            if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                self.h11.start_next_cycle()
                continue
            self.result.closed_by = "close"
            break
        self.result.engine_errors = list(self.engine.errors)
        return self.result

    async def exchange(self, request: h11.Request, exchange: Exchange) -> None:
        path, _, query = request.target.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.1"},
            "http_version": request.http_version.decode(),
            "method": exchange.method,
            "scheme": "http",
            "path": unquote(path.decode("ascii")),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "extensions": {},
        }
        body_done = False

        async def receive() -> dict[str, Any]:
            nonlocal body_done
            if not body_done:
                if self.h11.they_are_waiting_for_100_continue:
                    self.write(h11.InformationalResponse(status_code=100, headers=[]))
                try:
                    event = self.next_event()
                except h11.RemoteProtocolError as error:  # a broken body: 400 and close
                    self.refuse(error, exchange)
                    body_done = True
                    return {"type": "http.disconnect"}
                if isinstance(event, h11.Data):
                    exchange.request_bytes += bytes(event.data)
                    exchange.request_body += bytes(event.data)
                    return {"type": "http.request", "body": bytes(event.data), "more_body": True}
                if isinstance(event, h11.EndOfMessage):
                    body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                body_done = exchange.client_left = True  # ConnectionClosed mid-body
                self.result.closed_by = "client-left"
                return {"type": "http.disconnect"}
            await self.left.wait()
            exchange.client_left = True
            self.result.closed_by = "client-left"
            return {"type": "http.disconnect"}

        async def send(message: Mapping[str, Any]) -> None:
            self.on_message(exchange, message)

        try:
            await self.asgi(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - hypercorn would log it and answer 500: a finding
            exchange.problems.append(f"the ASGI app raised {type(exc).__name__}: {exc}")
        if exchange.status is None and not exchange.client_left and exchange.protocol_error is None:
            exchange.problems.append("the app returned without starting a response")
        elif exchange.status is not None and not exchange.ended and not exchange.client_left:
            exchange.problems.append("the app returned without ending its response")
        if exchange.client_left:
            self.result.closed_by = "client-left"
        elif exchange.problems or (exchange.status is not None and not exchange.ended):
            self.result.closed_by = "close"  # hypercorn closes a connection whose response broke

    def on_message(self, exchange: Exchange, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        if exchange.client_left or exchange.protocol_error is not None:
            return  # hypercorn drops what an app sends after the client left
        if exchange.ended:
            exchange.problems.append(f"{kind} after the response ended")
            return
        try:
            if kind == "http.response.start":
                if exchange.status is not None:
                    exchange.problems.append("a second http.response.start")
                    return
                status, headers = message["status"], list(message.get("headers", ()))
                if not isinstance(status, int) or not 200 <= status < 600:
                    exchange.problems.append(f"status {status!r} is not a final HTTP status")
                    return
                exchange.status, exchange.headers = status, headers
                self.write(h11.Response(status_code=status, headers=headers))
            elif kind == "http.response.body":
                if exchange.status is None:
                    exchange.problems.append("http.response.body before http.response.start")
                    return
                data = bytes(message.get("body", b""))
                exchange.body += data
                if data and not _suppress_body(exchange.wire_method, exchange.status):
                    self.write(h11.Data(data=data))
                if not message.get("more_body", False):
                    self.write(h11.EndOfMessage())
                    exchange.ended = True
            else:
                exchange.problems.append(f"unknown ASGI message {kind!r}")
        except (h11.LocalProtocolError, KeyError, TypeError, ValueError) as exc:
            exchange.problems.append(f"h11 refused the response: {type(exc).__name__}: {exc}")


@functools.cache
def _default_engine() -> FakeEngine:
    """A fake engine for the byte-level tokenizer every fuzz model uses."""
    tokenizer = ByteTokenizer()
    return FakeEngine(tokenizer.vocab_size, tokenizer.all_special_ids, tokenizer.eos_token_ids)


def _engine_for(server: Server) -> FakeEngine:
    """The default engine, or one over the vision model's vocabulary for a server of one."""
    vision = next((model for model in server.models if model.multimodal is not None), None)
    if vision is None:
        return _default_engine()
    tokenizer = vision.tokenizer
    return FakeEngine(tokenizer.vocab_size, tokenizer.all_special_ids, tokenizer.eos_token_ids)


async def _serve(
    server: Server,
    engine: FakeEngine,
    data: bytes,
    splits: Sequence[int],
    scripts: Sequence[EngineScript],
    hang_seconds: float,
) -> Connection:
    served: _Served | None = None
    client = ServedEngine(engine, lambda: served.left.set() if served is not None else None)
    engines = {name: client for model in server.models for name in model.names}
    asgi = AsgiApp(server.app, engines, max_body_bytes=server.max_body_bytes, fetch_media=client.fetch_media)
    served = _Served(asgi, client, data, splits)
    try:
        with anyio.fail_after(hang_seconds):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(client.run)
                result = await served.serve(scripts)
                tasks.cancel_scope.cancel()
    except TimeoutError:
        session = client.session
        state = (
            f"engine steps {session.steps}, busy {session.busy}, generates {len(session.transcript.generates)},"
            f" encodes {len(session.transcript.encodes)}, aborts {len(session.transcript.aborts)}"
            if session is not None
            else "no engine session"
        )
        records = [(e.method, e.target, e.status, e.ended, e.body[:200]) for e in served.result.exchanges]
        raise OracleError(
            f"hang: the connection was not served within {hang_seconds} s ({state}); {records}"
        ) from None
    return result


def serve_bytes(
    server: Server,
    data: bytes,
    *,
    splits: Sequence[int] = (),
    scripts: Sequence[EngineScript] = (EngineScript(),),
    backend: str = "asyncio",
    engine: FakeEngine | None = None,
    hang_seconds: float = HANG_SECONDS,
) -> Connection:
    """Serve one client connection that writes `data` (in writes cut at `splits`) and then closes.

    `scripts[i]` drives the engine for the connection's i-th request (cycling). Raises
    `OracleError` on a hang; everything else is recorded for `check_connection`.
    """
    fake = engine or _engine_for(server)
    return anyio.run(_serve, server, fake, data, splits, scripts, hang_seconds, backend=backend)


# ---------------------------------------------------------------------------------------------
# what every response must be


def check_connection(connection: Connection) -> None:
    """The engine saw no contract violation and no request left engine work running."""
    expect(not connection.engine_errors, "the core broke the runtime contract", connection.engine_errors)
    expect(not connection.leaks, f"engine work left running after its request ended: {connection.leaks}")


def check_response(exchange: Exchange) -> None:
    """One response, whatever was asked: well formed, no 5xx but an injected engine failure of
    that status, an OpenAI-shaped error for 4xx/5xx, JSON or SSE that parses, no leaked traceback."""
    where = f"{exchange.method} {exchange.target[:80]!r} -> {exchange.status}"
    expect(not exchange.problems, f"{where}: malformed response", exchange.problems, exchange.body[:500])
    if exchange.client_left and not exchange.ended:
        return
    status = exchange.status
    expect(status is not None, f"{where}: no response")
    assert status is not None
    leak = traceback_leak(exchange.body, exchange.request_bytes)
    expect(leak is None, f"{where}: the body carries a Python exception: {leak!r}", exchange.body[:2000])
    if exchange.protocol_error is not None:
        expect(status in (400, 413, 414, 431, 501), f"{where}: h11 error answered {status}")
        expect(exchange.header(b"connection") == b"close", f"{where}: not closed after a protocol error")
        return
    if status >= 500:
        expect(
            exchange.engine_failure == status,
            f"{where}: a 5xx without an injected engine failure of that status"
            f" (engine failure: {exchange.engine_failure})",
            exchange.body[:2000],
        )
    content_type = (exchange.header(b"content-type") or b"").split(b";")[0].strip().lower()
    if status in (204, 304):
        expect(not exchange.body, f"{where}: a body on a {status}", exchange.body[:200])
        return
    if status >= 400:
        check_error_payload(exchange.body, status)
    elif content_type == b"application/json":
        try:
            strict_json(exchange.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise OracleError(
                f"{where}: a JSON success that does not parse ({exc})", exchange.body[:500]
            ) from None
    elif content_type == b"text/event-stream":
        for payload in check_sse(exchange.body, where):
            error = payload.get("error") if isinstance(payload, dict) else None
            if isinstance(error, dict) and isinstance(error.get("code"), int) and error["code"] >= 500:
                expect(
                    exchange.engine_failure == error["code"],
                    f"{where}: an SSE error frame {error['code']} without an injected engine failure",
                    payload,
                )


def check_sse(body: bytes, where: str) -> list[Any]:
    """Every SSE frame is `data: <JSON>`; the stream ends with `data: [DONE]`. Returns the payloads."""
    expect(body.endswith(b"\n\n"), f"{where}: the stream does not end with a blank line", body[-200:])
    frames = body[:-2].split(b"\n\n")
    expect(frames[-1] == b"data: [DONE]", f"{where}: the stream does not end with data: [DONE]", body[-200:])
    payloads = []
    for frame in frames[:-1]:
        expect(frame.startswith(b"data: "), f"{where}: an SSE frame without data:", frame[:200])
        try:
            payloads.append(strict_json(frame[6:]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise OracleError(f"{where}: an SSE frame that is not JSON ({exc})", frame[:300]) from None
    return payloads


def json_body(exchange: Exchange) -> Any:
    """The response body as JSON (after `check_response` said it parses)."""
    return json.loads(exchange.body)


def request_media_parts(exchange: Exchange) -> int:
    """How many media parts the request's body holds (0 when it is not a JSON object)."""
    try:
        body = json.loads(exchange.request_body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return 0
    return len(media_parts(body)) if isinstance(body, dict) else 0


def check_media_exchange(exchange: Exchange, server: Server) -> None:
    """The media rules through the served stack: a text-only server never fetches nor sends media;
    a vision model's engine work holds its items on their placeholder runs
    (`fuzz.oracle.check_media_commands`); once media was fetched the answer is a 200 (never after a
    failed fetch) or a 400 with param "messages" naming a part, unless the engine injected a failure."""
    spec = server.multimodal
    chat = exchange.target.split(b"?", 1)[0] == b"/v1/chat/completions"
    check_media_commands(exchange.commands, spec, chat=chat)
    where = f"{exchange.method} {exchange.target[:80]!r} -> {exchange.status}"
    expect(
        spec is not None or not exchange.fetches,
        f"{where}: a text-only server fetched media",
        exchange.fetches,
    )
    status = exchange.status
    if not exchange.fetches or status is None or not exchange.ended or status == exchange.engine_failure:
        return
    if status < 300:  # every URL is an image's: only a sample's bytes can make it usable
        unusable = [
            result
            for result in exchange.fetched
            if isinstance(result, MediaFetchFailed) or media_samples.sample_name(result.data) is None
        ]
        expect(not unusable, f"{where}: a success although a fetch failed or returned no image", unusable)
        return
    error = strict_json(exchange.body).get("error")
    expect(
        status == 400
        and isinstance(error, dict)
        and error.get("param") == "messages"
        and named_part(error.get("message")) is not None,
        f"{where}: after its media was fetched a request may only fail with a 400 naming a part",
        exchange.body[:500],
    )
