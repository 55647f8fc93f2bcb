"""The served-stack driver catches what it claims to: hangs, tracebacks, 5xx, malformed responses,
and it serves what a real server would (pipelined requests in order, a 400 for broken HTTP)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from fuzz import harness
from fuzz.engine_driver import EngineScript
from fuzz.oracle import OracleError, traceback_leak
from fuzz.served import (
    Server,
    check_connection,
    check_media_exchange,
    check_response,
    make_server,
    request_media_parts,
    serve_bytes,
)
from protocol.engine_api import Command, Event, Generate, SamplingParams
from protocol.media.fetch import MediaRequest
from protocol.outputs import Body, EndResponse, Output, StartResponse, Submit

JSON = ((b"content-type", b"application/json"),)


class _Call:
    """A scripted call: `outputs` at start; finished unless it waits for the engine forever."""

    def __init__(self, outputs: list[Output], *, finished: bool = True) -> None:
        self.model = harness.MODEL.name
        self.outputs = outputs
        self.finished = finished

    def start(self) -> list[Output]:
        return self.outputs

    def feed(self, events: Sequence[Event]) -> list[Output]:
        return []

    def disconnected(self) -> list[Command]:
        return []


class _Core:
    def __init__(self, call: Any) -> None:
        self.call = call

    def handle(self, method: str, path: str, headers: Any, body: bytes, **status: Any) -> _Call:
        return self.call()


def _stub(call: Any) -> Server:
    return Server("stub", _Core(call), (harness.MODEL,))


def _answer(status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = JSON) -> Any:
    return lambda: _Call([StartResponse(status, headers), Body(body), EndResponse()])


GET = b"GET /v1/models HTTP/1.1\r\nHost: testserver\r\n\r\n"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_call_that_never_finishes_is_reported_as_a_hang(backend: str) -> None:
    generate = Generate("g1", (1, 2, 3), SamplingParams(max_tokens=1))
    hung = _stub(lambda: _Call([Submit((generate,))], finished=False))
    with pytest.raises(OracleError, match="hang"):
        serve_bytes(hung, GET, backend=backend, hang_seconds=0.2)


def test_a_traceback_in_a_body_is_caught() -> None:
    body = b'{"error":{"message":"Traceback (most recent call last):\\n  File \\"x.py\\", line 3","type":"E","param":null,"code":400}}'
    (exchange,) = serve_bytes(_stub(_answer(400, body)), GET).exchanges
    with pytest.raises(OracleError, match="Python exception"):
        check_response(exchange)


def test_an_exception_repr_is_caught_unless_the_client_sent_it() -> None:
    assert traceback_leak(b"bad value: KeyError('x')") == "KeyError('"
    assert traceback_leak(b"'NoneType' object has no attribute 'get'") is not None
    assert traceback_leak(b"The model `ValueError('` does not exist.", b'{"model": "ValueError(\'"}') is None


def test_a_5xx_without_an_engine_failure_is_caught() -> None:
    body = b'{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}'
    (exchange,) = serve_bytes(_stub(_answer(500, body)), GET).exchanges
    with pytest.raises(OracleError, match="5xx"):
        check_response(exchange)


def test_a_response_h11_refuses_is_caught() -> None:
    broken = _answer(200, b"{}", ((b"x-split", b"a\r\nInjected: yes"),))
    (exchange,) = serve_bytes(_stub(broken), GET).exchanges
    with pytest.raises(OracleError, match="malformed"):
        check_response(exchange)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_pipelined_requests_are_answered_in_order(backend: str) -> None:
    body = b'{"prompt": "Hi", "max_tokens": 3}'
    post = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    data = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" + post % (len(body), body) + GET
    connection = serve_bytes(make_server("default", [harness.MODEL]), data, splits=(7, 50), backend=backend)
    assert [(e.method, e.status) for e in connection.exchanges] == [("GET", 200), ("POST", 200), ("GET", 200)]
    for exchange in connection.exchanges:
        check_response(exchange)


def test_broken_http_gets_a_400_and_the_connection_closes() -> None:
    data = b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + GET
    connection = serve_bytes(make_server("default", [harness.MODEL]), data)
    (exchange,) = connection.exchanges  # the request behind it is never read
    assert exchange.protocol_error is not None and exchange.status == 400
    assert exchange.header(b"connection") == b"close"
    check_response(exchange)


def _post_chat(body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(data) + data


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_fake_fetcher_answers_a_vision_servers_media_urls(backend: str) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    data = _post_chat(
        {
            "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}],
            "max_tokens": 2,
        }
    )
    server = make_server("vision", [harness.VISION_MODEL])
    for answers, status in ((("gif",), 200), (("html",), 400), (("failed",), 400)):
        connection = serve_bytes(server, data, scripts=[EngineScript(fetch_answers=answers)], backend=backend)
        check_connection(connection)
        (exchange,) = connection.exchanges
        assert exchange.status == status and [f.url for f in exchange.fetches] == [
            "https://example.com/cat.png"
        ]
        assert request_media_parts(exchange) == 1
        check_response(exchange)
        check_media_exchange(exchange, server)
        if status == 200:
            (generate,) = exchange.commands
            assert len(generate.media) == 1  # type: ignore[union-attr]


def test_media_through_a_text_only_server_is_refused_and_checked() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    server = make_server("default", [harness.MODEL])
    (exchange,) = serve_bytes(
        server, _post_chat({"messages": [{"role": "user", "content": [image]}]})
    ).exchanges
    assert exchange.status == 400 and not exchange.fetches
    check_media_exchange(exchange, server)
    exchange.fetches = [MediaRequest(0, "https://example.com/cat.png", "image")]
    with pytest.raises(OracleError, match="text-only server fetched media"):
        check_media_exchange(exchange, server)
