"""The ASGI shell over real sockets under both runtimes, with the scripted engine and a stand-in core.

These pin the transport behaviour (HTTP/1.1, HTTP/2 over TLS with ALPN, h2c, multiplexing,
disconnects, body limits, unexpected failures) independently of the OpenAI protocol core.
"""

from __future__ import annotations

import asyncio
import json
import socket

import h11
import httpx

from tests.runtime.fakes import EchoApp, ScriptedEngine
from tests.runtime.h2c import H2cConnection
from tests.runtime.server import ServerThread, client_ssl_context, shell_over

REPLY = "Hello there!"


def serve_echo(runtime: str, engine: ScriptedEngine | None = None, *, shell_options=None, **server_options):
    engine = engine or ScriptedEngine(reply=REPLY)
    shell = shell_over(
        EchoApp(engine.model_name), {engine.model_name: engine}, runtime, **(shell_options or {})
    )
    return ServerThread(shell, runtime, **server_options)


def stream_text(response: httpx.Response) -> str:
    frames = response.read().decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    return "".join(frame.removeprefix("data: ") for frame in frames[:-2])


def test_http1_non_streaming_and_streaming(runtime):
    with serve_echo(runtime) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        plain = client.post("/generate", json={"prompt": "hi"})
        assert plain.http_version == "HTTP/1.1"
        assert plain.status_code == 200
        assert plain.json() == {"text": REPLY, "finish_reason": "stop"}

        with client.stream("POST", "/generate", json={"prompt": "hi", "stream": True}) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"] == "text/event-stream"
            assert stream_text(streamed) == REPLY


def test_max_tokens_reaches_the_engine(runtime):
    with serve_echo(runtime) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/generate", json={"prompt": "hi", "max_tokens": 5})
        assert response.json() == {"text": REPLY[:5], "finish_reason": "length"}


def test_http2_over_tls_negotiated_by_alpn(runtime, ca, server_pem):
    with (
        serve_echo(runtime, tls_pem=server_pem) as server,
        httpx.Client(base_url=server.url, http2=True, verify=client_ssl_context(ca), timeout=30) as client,
    ):
        plain = client.post("/generate", json={"prompt": "hi"})
        assert plain.http_version == "HTTP/2"
        assert plain.json()["text"] == REPLY
        with client.stream("POST", "/generate", json={"prompt": "hi", "stream": True}) as streamed:
            assert streamed.http_version == "HTTP/2"
            assert stream_text(streamed) == REPLY


def test_no_http2_keeps_tls_clients_on_http1(runtime, ca, server_pem):
    with (
        serve_echo(runtime, tls_pem=server_pem, http2=False) as server,
        httpx.Client(base_url=server.url, http2=True, verify=client_ssl_context(ca), timeout=30) as client,
    ):
        response = client.post("/generate", json={"prompt": "hi"})
        assert response.http_version == "HTTP/1.1"
        assert response.json()["text"] == REPLY


def test_h2c_with_prior_knowledge(runtime):
    with (
        serve_echo(runtime, http2=False) as server,
        httpx.Client(base_url=server.url, http1=False, http2=True, timeout=30) as client,
    ):
        with client.stream("POST", "/generate", json={"prompt": "hi", "stream": True}) as streamed:
            assert streamed.http_version == "HTTP/2"
            assert stream_text(streamed) == REPLY


def test_concurrent_streams_multiplex_on_one_http2_connection(runtime, ca, server_pem):
    streams = 4
    # The engine produces nothing until all streams are running: they must be open at once.
    engine = ScriptedEngine(reply=REPLY, gate=streams)
    shell = shell_over(EchoApp(engine.model_name), {engine.model_name: engine}, runtime)
    client_addresses = []

    async def recording_shell(scope, receive, send):
        if scope["type"] == "http":
            client_addresses.append((scope["http_version"], tuple(scope["client"])))
        await shell(scope, receive, send)

    recording_shell.on_startup = shell.on_startup  # ServerThread hooks its readiness signal here

    async def run_streams(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=url, http2=True, verify=client_ssl_context(ca), timeout=30
        ) as client:

            async def one(prompt: str) -> httpx.Response:
                async with client.stream(
                    "POST", "/generate", json={"prompt": prompt, "stream": True}
                ) as response:
                    await response.aread()
                    return response

            return await asyncio.gather(*(one(f"p{i}") for i in range(streams)))

    with ServerThread(recording_shell, runtime, tls_pem=server_pem) as server:
        responses = asyncio.run(run_streams(server.url))

    assert [r.http_version for r in responses] == ["HTTP/2"] * streams
    assert all(stream_text(r) == REPLY for r in responses)
    assert len(client_addresses) == streams
    assert {version for version, _ in client_addresses} == {"2"}
    assert len({address for _, address in client_addresses}) == 1, "all streams on one connection"


def test_client_disconnect_mid_stream_aborts_the_request(runtime):
    engine = ScriptedEngine(reply=REPLY, hold_after=3)  # the stream stays open after 3 tokens
    with serve_echo(runtime, engine) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/generate", json={"prompt": "hi", "stream": True}) as streamed:
            assert next(streamed.iter_raw()).startswith(b"data: H")
        # leaving the block mid-body closes the HTTP/1.1 connection
        assert engine.aborted.get(timeout=10) == "req-1"


def test_http2_stream_reset_aborts_that_request_only(runtime):
    engine = ScriptedEngine(reply=REPLY, hold_after=3)
    with serve_echo(runtime, engine) as server, H2cConnection(server.port) as connection:
        stream_id = connection.post("/generate", {"prompt": "hi", "stream": True})
        assert connection.read_data(stream_id).startswith(b"data: H")
        connection.reset(stream_id)
        assert engine.aborted.get(timeout=10) == "req-1"
        # the connection itself lives on: a new stream on it is served
        engine.release()
        second = connection.post("/generate", {"prompt": "again"})
        assert json.loads(connection.read_until_end(second)) == {"text": REPLY, "finish_reason": "stop"}


def test_body_over_the_limit_is_413_openai_shaped(runtime):
    with (
        serve_echo(runtime, shell_options={"max_body_bytes": 1000}) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        declared = client.post("/generate", content=b"x" * 2000)
        chunked = client.post("/generate", content=iter([b"x" * 600, b"x" * 600]))
        within = client.post("/generate", json={"prompt": "y" * 900})
    for response in (declared, chunked):
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == 413
        assert error["type"] == "BadRequestError"
        assert "1000 bytes" in error["message"]
    assert within.status_code == 200


def _exchange(sock: socket.socket, client: h11.Connection, headers: list, parts: list[bytes]):
    """Send one POST /generate through an h11 client connection and read its whole response."""
    request = [h11.Request(method="POST", target="/generate", headers=[("Host", "x"), *headers])]
    for event in [*request, *(h11.Data(data=part) for part in parts), h11.EndOfMessage()]:
        sock.sendall(client.send(event))
    response, body = None, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            client.start_next_cycle()  # raises when the server said it will close
            return response, body
        else:
            raise AssertionError(f"the server closed the connection mid-response: {event!r}")


def test_connection_serves_the_next_request_after_a_413(runtime):
    """A 413 that reads the rest of the body keeps the HTTP/1.1 connection usable (no race with close)."""
    client = h11.Connection(h11.CLIENT)
    prompt = json.dumps({"prompt": "hi"}).encode()
    with (
        serve_echo(runtime, shell_options={"max_body_bytes": 1000}) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock,
    ):
        chunked, _ = _exchange(sock, client, [("Transfer-Encoding", "chunked")], [b"x" * 600, b"x" * 600])
        declared, _ = _exchange(sock, client, [("Content-Length", "2000")], [b"x" * 2000])
        within, answer = _exchange(sock, client, [("Content-Length", str(len(prompt)))], [prompt])
    assert [chunked.status_code, declared.status_code, within.status_code] == [413, 413, 200]
    assert json.loads(answer) == {"text": REPLY, "finish_reason": "stop"}


def test_core_failure_before_the_response_is_an_openai_500(runtime):
    with serve_echo(runtime) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/boom", json={})
        assert response.status_code == 500
        assert response.json() == {
            "error": {
                "message": "Internal server error",
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
        assert client.post("/generate", json={"prompt": "hi"}).status_code == 200  # the server lives on


def test_core_failure_mid_stream_ends_the_response_and_aborts(runtime):
    engine = ScriptedEngine(reply=REPLY, hold_after=1)
    with serve_echo(runtime, engine) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream(
            "POST", "/generate", json={"prompt": "hi", "stream": True, "fail_late": True}
        ) as streamed:
            assert streamed.status_code == 200
            chunks = streamed.iter_raw()
            assert next(chunks) == b"data: H\n\n"
            engine.release(1)  # the next engine step makes the core fail
            assert b"".join(chunks) == b""  # the body ends instead of hanging
        assert engine.aborted.get(timeout=10) == "req-1"


def test_a_model_whose_engine_is_not_running_gets_503(runtime):
    shell = shell_over(EchoApp("scripted"), {}, runtime)  # no engine was started for "scripted"
    with ServerThread(shell, runtime) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/generate", json={"prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "The engine for model 'scripted' is not running",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }


def test_health_follows_the_engine_and_lifespan_stops_it(runtime):
    engine = ScriptedEngine(reply=REPLY)
    with serve_echo(runtime, engine) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        engine.healthy = False
        assert client.get("/health").status_code == 503
        assert not engine.stopped.is_set()
    assert engine.stopped.is_set()


def test_query_string_reaches_the_core(runtime):
    app = EchoApp()
    engine = ScriptedEngine()
    with (
        ServerThread(shell_over(app, {engine.model_name: engine}, runtime), runtime) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        client.get("/health")
        client.get("/v1/models?limit=2")
    assert app.seen_paths == ["/health", "/v1/models?limit=2"]


def test_json_error_body_from_the_core_is_passed_through(runtime):
    with serve_echo(runtime) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.get("/nowhere")
    assert response.status_code == 404
    assert json.loads(response.content)["error"]["code"] == 404
