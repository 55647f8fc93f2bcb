"""Disconnect storm: 200 clients hang up mid-stream, over HTTP/1.1 and HTTP/2, under both runtimes.

100 HTTP/1.1 clients each read the first frames of a long stream and close their connection (half
of them at once, without waiting for the close handshake); 100 HTTP/2 streams over 10 cleartext
connections (prior knowledge) read their first frames, then half the connections reset each stream
(RST_STREAM) and stay open, the other half drop the whole connection. Afterwards nothing runs, no
KV block is held, the connections that only reset their streams still serve a request, and a new
client is answered normally.
"""

from __future__ import annotations

import asyncio
import json
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sansllm.args import DEFAULT_MODEL, parse_serve_args
from sansllm.assemble import build_asgi_app, engine_config_from_args
from tests.runtime.server import BRIDGES, RUNTIMES, ServerThread

pytestmark = pytest.mark.e2e

HTTP1_CLIENTS = 100
HTTP2_CONNECTIONS = 10
STREAMS_PER_CONNECTION = 10  # 100 HTTP/2 clients in all
DEADLINE_S = 120.0  # the storm and the wait for the engine to settle; a hang fails instead of stalling
FLAGS = ["--max-model-len", "2k"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
FIRST_FRAMES = 2  # data frames a client reads before hanging up (chat: the role, then a token)


def long_request(i: int) -> tuple[str, dict]:
    """Client i's stream: far longer than the client stays (1500 tokens, EOS ignored)."""
    body = {"model": DEFAULT_MODEL, "max_tokens": 1500, "ignore_eos": True, "stream": True, "temperature": 0}
    if i % 2:
        return "/v1/chat/completions", {
            **body,
            "messages": [{"role": "user", "content": f"Tell story number {i}."}],
        }
    return "/v1/completions", {**body, "prompt": f"Story number {i}: once upon a time"}


@pytest.fixture(scope="module")
def weights():
    from engine import load_model, resolve_model

    return load_model(resolve_model(DEFAULT_MODEL), "auto", "auto", False)


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, weights):
    from engine import Engine, EngineConfig

    args = parse_serve_args([DEFAULT_MODEL, *FLAGS], environ={})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    engine = Engine(config, loaded=weights)
    with ServerThread(build_asgi_app(args, [engine], BRIDGES[request.param]), request.param) as running:
        yield running, engine


# ---- HTTP/1.1 ----


async def http1_hang_up(port: int, i: int) -> None:
    path, body = long_request(i)
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = b""
    while received.count(b"data: ") < FIRST_FRAMES:
        more = await reader.read(65536)
        assert more, f"client {i}: the server closed the stream early: {received[-500:]!r}"
        received += more
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert b"[DONE]" not in received
    if i % 2:
        writer.transport.abort()  # drop the connection at once
    else:
        writer.close()
        await writer.wait_closed()


# ---- HTTP/2 (h2c, prior knowledge) ----


class H2cClient:
    """One HTTP/2 connection over asyncio streams, for what httpx cannot do: reset a stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.data: dict[int, bytearray] = {}
        self.status: dict[int, str] = {}
        self.ended: set[int] = set()
        self._flush()

    @classmethod
    async def connect(cls, port: int) -> H2cClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def post(self, path: str, body: dict) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        payload = json.dumps(body).encode()
        headers = [
            (":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1"),
            ("content-type", "application/json"), ("content-length", str(len(payload))),
        ]  # fmt: skip
        self.h2.send_headers(stream_id, headers)
        self.h2.send_data(stream_id, payload, end_stream=True)
        self._flush()
        self.data[stream_id] = bytearray()
        return stream_id

    async def receive_until(self, done) -> None:
        while not done():
            received = await self.reader.read(65536)
            if not received:
                raise ConnectionError("the server closed the connection")
            for event in self.h2.receive_data(received):
                if isinstance(event, h2.events.ResponseReceived):
                    self.status[event.stream_id] = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if event.stream_id in self.data:
                        self.data[event.stream_id] += event.data
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    self.ended.add(event.stream_id)
            self._flush()

    async def read_to_end(self, stream_id: int) -> bytes:
        await self.receive_until(lambda: stream_id in self.ended)
        return bytes(self.data.pop(stream_id))

    def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        del self.data[stream_id]
        self._flush()

    def _flush(self) -> None:
        self.writer.write(self.h2.data_to_send())


async def http2_hang_up(port: int, c: int) -> H2cClient | None:
    """Connection c's streams read their first frames; then reset them all (the connection is
    returned, open) or drop the connection (None)."""
    client = await H2cClient.connect(port)
    streams = [
        client.post(*long_request(HTTP1_CLIENTS + c * STREAMS_PER_CONNECTION + s))
        for s in range(STREAMS_PER_CONNECTION)
    ]
    await client.receive_until(
        lambda: all(client.data[s].count(b"data: ") >= FIRST_FRAMES or s in client.ended for s in streams)
    )
    assert client.ended.isdisjoint(streams), "a stream ended before its client hung up"
    assert {client.status[s] for s in streams} == {"200"}
    if c % 2:
        client.writer.transport.abort()
        return None
    for stream_id in streams:
        client.reset(stream_id)
    await client.writer.drain()
    return client


# ---- after the storm ----


def metrics_of(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def engine_gauge(metrics: dict, name: str) -> float:
    return metrics[(name, (("engine", "0"), ("model_name", DEFAULT_MODEL)))]


async def settled(url: str, deadline: float) -> None:
    """Poll /metrics until nothing runs or waits and no KV block is held (bounded by `deadline`)."""
    while True:
        metrics = await asyncio.to_thread(metrics_of, url)
        gauges = [
            engine_gauge(metrics, name)
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
        ]
        if gauges == [0, 0, 0]:
            return
        assert time.monotonic() < deadline, f"still running, waiting, KV usage: {gauges}"
        await asyncio.sleep(0.05)


def test_200_clients_hang_up_mid_stream_and_nothing_is_left_behind(server):
    running, engine = server

    async def storm() -> float:
        started = time.monotonic()
        deadline = started + DEADLINE_S
        async with asyncio.timeout(DEADLINE_S + 30):  # past the deadline `settled` reports
            outcomes = await asyncio.gather(
                *(http1_hang_up(running.port, i) for i in range(HTTP1_CLIENTS)),
                *(http2_hang_up(running.port, c) for c in range(HTTP2_CONNECTIONS)),
            )
            hung_up = time.monotonic() - started
            await settled(running.url, deadline)
            # the connections that only reset their streams still serve
            for client in [outcome for outcome in outcomes if isinstance(outcome, H2cClient)]:
                body = {"model": DEFAULT_MODEL, "messages": QUESTION, "temperature": 0}
                stream_id = client.post("/v1/chat/completions", body)
                reply = json.loads(await client.read_to_end(stream_id))
                assert client.status[stream_id] == "200"
                assert reply["choices"][0]["message"]["content"] == ANSWER
                client.writer.close()
        return hung_up

    started = time.perf_counter()
    hung_up = asyncio.run(storm())
    print(
        f"\n{HTTP1_CLIENTS} HTTP/1.1 + {HTTP2_CONNECTIONS * STREAMS_PER_CONNECTION} HTTP/2 clients hung up "
        f"after {hung_up:.1f} s; settled after {time.perf_counter() - started:.1f} s"
    )
    stats = engine.stats()  # the engine's own counters, as of its last step
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    # and a new client is served normally, streamed and not
    with httpx.Client(base_url=running.url, timeout=60) as client:
        body = {"model": DEFAULT_MODEL, "messages": QUESTION, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == ANSWER
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
        deltas = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]]
        assert "".join(deltas) == ANSWER
    # no hang-up was answered as a server error
    errors = {
        labels: value
        for (name, labels), value in metrics_of(running.url).items()
        if name == "http_requests_total" and ("status", "5xx") in labels
    }
    assert sum(errors.values()) == 0, errors
