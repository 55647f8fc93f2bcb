"""The Ray deployment's request path without Ray: ingress relay -> forwarded request -> the replica's
ASGI app (the real one, over a scripted engine and the asyncio bridge), and its options and metrics.

tests/ray/test_ray_serve.py runs the same path on a real local cluster (`make test-ray`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime_asyncio.bridge import AsyncioEngineBridge
from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app
from sansllm.prefix_routing import PrefixAffinity
from sansllm.serve_ray.forwarding import REPLICA_HEADER, ForwardedRequest, Lifespan, Relay, play_forwarded
from sansllm.serve_ray.metrics_export import RegistryExporter, ray_name
from sansllm.serve_ray.options import parse_app_options
from tests.runtime.fakes import ScriptedEngine

MODEL = "scripted-model"
REPLY = "Paris, of course."


def chat_body(stream: bool, content: str = "Capital of France?") -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream}
    ).encode()


def forwarded(body: bytes, path: str = "/v1/chat/completions") -> ForwardedRequest:
    return ForwardedRequest("POST", path, headers=[(b"content-type", b"application/json")], body=body)


class Replica:
    """The engine replica's side: the server's real ASGI app, started by `Lifespan`."""

    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine
        args = parse_serve_args([MODEL], environ={})
        self.app = build_asgi_app(args, [engine], AsyncioEngineBridge)
        self.lifespan = Lifespan(self.app)

    def forward(self, request: ForwardedRequest) -> AsyncIterator[list[dict]]:
        return play_forwarded(self.app, request, [(REPLICA_HEADER, b"r1")])


async def collect(batches: AsyncIterator[list[dict]]) -> list[dict]:
    return [message async for batch in batches for message in batch]


def body_of(messages: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def run(coro):
    return asyncio.run(coro)


def test_a_forwarded_request_is_answered_by_the_replicas_app_with_its_replica_header():
    async def scenario():
        replica = Replica(ScriptedEngine(reply=REPLY, model_name=MODEL))
        await replica.lifespan.startup()
        try:
            whole = await collect(replica.forward(forwarded(chat_body(stream=False))))
            stream = await collect(replica.forward(forwarded(chat_body(stream=True))))
            missing = await collect(replica.forward(forwarded(b"{}", path="/v1/nothing")))
        finally:
            await replica.lifespan.shutdown()
        return whole, stream, missing, replica.engine

    whole, stream, missing, engine = run(scenario())
    assert whole[0]["status"] == 200 and (REPLICA_HEADER, b"r1") in whole[0]["headers"]
    assert json.loads(body_of(whole))["choices"][0]["message"]["content"] == REPLY
    frames = [line[6:] for line in body_of(stream).decode().splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    assert "".join(json.loads(f)["choices"][0]["delta"].get("content", "") for f in frames[:-1]) == REPLY
    assert missing[0]["status"] == 404 and json.loads(body_of(missing))["error"]["code"] == 404
    assert engine.stopped.is_set(), "the lifespan's shutdown stopped the engine"


def test_closing_the_stream_early_aborts_the_engine_work():
    async def scenario():
        engine = ScriptedEngine(reply=REPLY, model_name=MODEL, hold_after=3)  # the stream stays open
        replica = Replica(engine)
        await replica.lifespan.startup()
        try:
            stream = replica.forward(forwarded(chat_body(stream=True)))
            async for batch in stream:
                if any(m["type"] == "http.response.body" and m.get("body") for m in batch):
                    break
            await stream.aclose()  # the ingress's client went away; Ray cancels the call
            aborted = await asyncio.to_thread(engine.aborted.get, timeout=10)
        finally:
            await replica.lifespan.shutdown()
        return aborted, engine

    aborted, engine = run(scenario())
    assert aborted == engine.received[0].request_id


def test_lifespan_reports_a_failed_startup():
    async def failing_app(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no engine"})

    with pytest.raises(RuntimeError, match="startup failed: no engine"):
        run(Lifespan(failing_app).startup())


class ReplicaGone(Exception):
    """Stands for Ray's ActorDiedError."""


def scope(method: str = "POST") -> dict:
    return {"type": "http", "method": method, "path": "/v1/chat/completions", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"connection", b"keep-alive")],
            "client": ("127.0.0.1", 5000), "root_path": ""}  # fmt: skip


async def relay_one(relay: Relay, body: bytes, method: str = "POST") -> list[dict]:
    sent: list[dict] = []
    parts = [body[:7], body[7:]]  # the body arrives in two pieces

    async def receive():
        piece = parts.pop(0) if parts else b""
        return {"type": "http.request", "body": piece, "more_body": bool(parts)}

    async def send(message):
        sent.append(message)

    await relay(scope(method=method), receive, send)
    return sent


def flaky(replica: Replica, failures: int, after_messages: int = 0):
    """A call that loses its replica `failures` times, after passing on `after_messages` messages."""
    calls: list[ForwardedRequest] = []

    async def call(request: ForwardedRequest):
        calls.append(request)
        passed = 0
        async for batch in replica.forward(request):
            for message in batch:
                if len(calls) <= failures and passed == after_messages:
                    raise ReplicaGone("the actor died")
                passed += 1
                yield [message]

    return call, calls


def test_the_relay_resends_a_request_whose_replica_died_before_answering():
    async def scenario():
        replica = Replica(ScriptedEngine(reply=REPLY, model_name=MODEL))
        await replica.lifespan.startup()
        try:
            call, calls = flaky(replica, failures=2)
            relay = Relay(call, lambda exc: isinstance(exc, ReplicaGone), affinity=PrefixAffinity(chunk_chars=16))
            sent = await relay_one(relay, chat_body(stream=False, content="x" * 100))
        finally:
            await replica.lifespan.shutdown()
        return sent, calls, relay

    sent, calls, relay = run(scenario())
    assert sent[0]["status"] == 200 and json.loads(body_of(sent))["choices"][0]["message"]["content"] == REPLY
    assert relay.resent == 2 and len(calls) == 3 and relay.in_flight == 0
    request = calls[-1]
    assert request.body == chat_body(stream=False, content="x" * 100)
    assert (b"connection", b"keep-alive") not in request.headers and request.client == ("127.0.0.1", 5000)
    assert request.prefix_keys == PrefixAffinity(chunk_chars=16).keys(f"{MODEL}\x00\x00user\x00" + "x" * 100)


def test_a_stream_cut_after_its_first_bytes_ends_with_an_error_frame_and_done():
    async def scenario():
        replica = Replica(ScriptedEngine(reply=REPLY, model_name=MODEL))
        await replica.lifespan.startup()
        try:
            call, calls = flaky(replica, failures=1, after_messages=2)  # start and one frame got through
            relay = Relay(call, lambda exc: isinstance(exc, ReplicaGone))
            sent = await relay_one(relay, chat_body(stream=True))
        finally:
            await replica.lifespan.shutdown()
        return sent, calls, relay

    sent, calls, relay = run(scenario())
    assert sent[0]["status"] == 200 and len(calls) == 1 and relay.resent == 0
    frames = [line[6:] for line in body_of(sent).decode().splitlines() if line.startswith("data: ")]
    assert json.loads(frames[-2])["error"]["code"] == 503 and frames[-1] == "[DONE]"
    assert sent[-1]["more_body"] is False


def test_the_relay_answers_503_when_every_try_lost_its_replica_and_passes_other_errors_on():
    async def gone(request):
        raise ReplicaGone("the actor died")
        yield  # pragma: no cover

    async def broken(request):
        raise ValueError("a bug")
        yield  # pragma: no cover

    relay = Relay(gone, lambda exc: isinstance(exc, ReplicaGone), retries=1)
    sent = run(relay_one(relay, chat_body(stream=False)))
    assert sent[0]["status"] == 503 and "stopped" in json.loads(body_of(sent))["error"]["message"]
    assert relay.resent == 1
    with pytest.raises(ValueError, match="a bug"):
        run(relay_one(Relay(broken, lambda exc: isinstance(exc, ReplicaGone)), chat_body(stream=False)))


def test_the_relay_refuses_an_oversized_body_and_keys_only_json_posts():
    async def never(request):
        raise AssertionError("not forwarded")
        yield  # pragma: no cover

    sent = run(relay_one(Relay(never, lambda exc: False, max_body_bytes=10), b"x" * 11))
    assert sent[0]["status"] == 413 and json.loads(body_of(sent))["error"]["code"] == 413
    relay = Relay(never, lambda exc: False, affinity=PrefixAffinity(chunk_chars=16))
    assert relay._keys({"method": "GET"}, b'{"prompt": "' + b"y" * 64 + b'"}') == []
    assert relay._keys({"method": "POST"}, b"not json at all") == []
    assert relay._keys({"method": "POST"}, b'{"prompt": broken') == []
    assert len(relay._keys({"method": "POST"}, b'{"prompt": "' + b"y" * 63 + b'"}')) == 4  # "\x00" + 63
    same = b'{"model": "a", "prompt": "' + b"y" * 64 + b'"}'
    assert relay._keys({"method": "POST"}, same) != relay._keys({"method": "POST"}, same.replace(b'"a"', b'"b"'))


def test_options_from_serve_run_strings():
    opts = parse_app_options({"model": "SmolLM2-135M-Instruct", "num_replicas": "2", "ingress": "true",
                              "serve_args": "--max-model-len 2048 --api-key 'a b'", "num_cpus": "0.5"})  # fmt: skip
    assert opts.num_replicas == 2 and opts.num_cpus == 0.5 and opts.ingress is True
    assert opts.serve_argv == ["SmolLM2-135M-Instruct", "--max-model-len", "2048", "--api-key", "a b"]
    assert opts.autoscaling_config is None
    scaled = parse_app_options({"min_replicas": "1", "max_replicas": "4", "target_ongoing_requests": "8"})
    assert scaled.autoscaling_config == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert parse_app_options({}).serve_argv == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"num_replica": "2"}, "unknown sansllm Ray option(s) num_replica"),
        ({"num_replicas": "two"}, "num_replicas"),
        ({"num_replicas": "0"}, "at least 1"),
        ({"min_replicas": "1"}, "both min_replicas and max_replicas"),
        ({"min_replicas": "3", "max_replicas": "2"}, "min_replicas <= max_replicas"),
        ({"routing": "random"}, "routing"),
        ({"ingress": "false"}, "routing=prefix needs the ingress"),
        ({"chunk_chars": "4"}, "chunk_chars >= 16"),
    ],
)
def test_bad_options_are_errors_that_name_the_key(args, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_app_options(args)


class Recorded:
    """Stands for a Ray metric: records what is done to it."""

    made: dict[str, Recorded] = {}

    def __init__(self, name: str, *, description: str = "", tag_keys: tuple = (), boundaries=None) -> None:
        self.name, self.tag_keys, self.boundaries = name, tag_keys, boundaries
        self.calls: list[tuple[str, float, dict]] = []
        Recorded.made[name] = self

    def inc(self, value, tags):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def observe(self, value, tags):
        self.calls.append(("observe", value, tags))


def test_the_replica_registry_is_copied_into_ray_metrics_as_increments():
    registry = CollectorRegistry(auto_describe=False)
    tokens = Counter("vllm:prompt_tokens", "Prompt tokens.", ["model_name"], registry=registry)
    running = Gauge("vllm:num_requests_running", "Running.", ["model_name"], registry=registry)
    latency = Histogram("vllm:e2e_request_latency_seconds", "E2E.", ["model_name"], registry=registry,
                        buckets=(0.5, 1.0))  # fmt: skip
    Recorded.made.clear()
    exporter = RegistryExporter(registry, counter=Recorded, gauge=Recorded, histogram=Recorded)
    tokens.labels("m").inc(10)
    running.labels("m").set(3)
    latency.labels("m").observe(0.2)
    latency.labels("m").observe(7.0)
    exporter.export()
    tokens.labels("m").inc(5)
    latency.labels("m").observe(0.7)
    exporter.export()
    made = Recorded.made
    assert made["sansllm_prompt_tokens"].calls == [("inc", 10.0, {"model_name": "m"}), ("inc", 5.0, {"model_name": "m"})]
    assert made["sansllm_num_requests_running"].calls == [("set", 3.0, {"model_name": "m"})] * 2
    histogram = made["sansllm_e2e_request_latency_seconds"]
    assert histogram.boundaries == [0.5, 1.0] and histogram.tag_keys == ("model_name",)
    assert [value for _, value, _ in histogram.calls] == [0.5, 2.0, 1.0]  # bucket bounds; +Inf: twice the last
    assert ray_name("vllm:kv_cache_usage_perc") == "sansllm_kv_cache_usage_perc"
    assert ray_name("http_requests") == "sansllm_http_requests"


def test_sansllm_serve_ray_passes_the_server_flags_to_the_replicas_and_the_rest_to_the_deployment():
    from sansllm.serve_ray.launch import app_arguments, replica_argv

    argv = ["SmolLM2-135M-Instruct", "--ray", "--ray-replicas", "3", "--host=0.0.0.0", "--port", "9000",
            "--max-model-len", "2048", "--ray-option", "num_cpus=2", "--ray-option=routing=prefix"]  # fmt: skip
    assert replica_argv(argv) == ["SmolLM2-135M-Instruct", "--max-model-len", "2048"]
    args = parse_serve_args(argv, environ={})
    assert args.ray and args.ray_replicas == 3
    assert app_arguments(args, argv) == {
        "serve_args": "SmolLM2-135M-Instruct --max-model-len 2048", "num_replicas": "3", "num_cpus": "2",
        "routing": "prefix",
    }  # fmt: skip
    with pytest.raises(ValueError, match="KEY=VALUE"):
        app_arguments(parse_serve_args(["--ray", "--ray-option", "num_cpus"], environ={}), [])
    with pytest.raises(ValueError, match="terminate TLS in front of it"):
        app_arguments(parse_serve_args(["--ray", "--ssl-certfile", "c.pem"], environ={}), [])
    with pytest.raises(ValueError, match="unknown sansllm Ray option"):
        app_arguments(parse_serve_args(["--ray", "--ray-option", "replicas=2"], environ={}), [])
