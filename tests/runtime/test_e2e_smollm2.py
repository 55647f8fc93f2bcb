"""End to end with the real engine and SmolLM2-135M-Instruct, over sockets, under both runtimes.

One model load for the module: each runtime's server gets its own engine over the shared weights.
The CLI entry points run as real processes (they load the model themselves) and stop on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from sansllm.args import DEFAULT_MODEL, parse_serve_args
from sansllm.assemble import build_asgi_app, engine_config_from_args
from tests.runtime.server import BRIDGES, RUNTIMES, ServerThread

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
FLAGS = ["--max-model-len", "2k"]


@pytest.fixture(scope="module")
def loaded_model():
    from engine import load_model, resolve_model

    return load_model(resolve_model(DEFAULT_MODEL), "auto", "auto", False)


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, loaded_model):
    from engine import Engine, EngineConfig

    args = parse_serve_args([DEFAULT_MODEL, *FLAGS], environ={})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    engine = Engine(config, loaded=loaded_model)
    with ServerThread(build_asgi_app(args, [engine], BRIDGES[request.param]), request.param) as running:
        yield running


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def test_greedy_capital_of_france(client):
    completion = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0)
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"


def test_async_client_streaming_and_not(server):
    async def ask():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as aclient:
            plain = await aclient.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0)
            stream = await aclient.chat.completions.create(
                model=DEFAULT_MODEL, messages=QUESTION, temperature=0, stream=True
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return plain.choices[0].message.content, streamed

    import asyncio

    assert asyncio.run(ask()) == (ANSWER, ANSWER)


@pytest.fixture(scope="module")
def tls_server(request, loaded_model, tmp_path_factory):
    """The real model over TLS, offering h2 by ALPN (one runtime is enough: the others test HTTP/2 broadly)."""
    import trustme

    from engine import Engine, EngineConfig

    ca = trustme.CA()
    pem = tmp_path_factory.mktemp("tls") / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    args = parse_serve_args([DEFAULT_MODEL, *FLAGS], environ={})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    engine = Engine(config, loaded=loaded_model)
    with ServerThread(build_asgi_app(args, [engine], BRIDGES["trio"]), "trio", tls_pem=pem) as running:
        yield running.url, str(ca_pem)


def test_http2_answers_like_http1(server, tls_server):
    body = {"model": DEFAULT_MODEL, "messages": QUESTION, "temperature": 0}
    with httpx.Client(timeout=120) as h1:
        reply = h1.post(f"{server.url}/v1/chat/completions", json=body)
        assert reply.http_version == "HTTP/1.1"
        expected = reply.json()["choices"][0]["message"]["content"]
    assert expected == ANSWER
    with httpx.Client(http1=False, http2=True, timeout=120) as h2c:  # cleartext, prior knowledge
        reply = h2c.post(f"{server.url}/v1/chat/completions", json=body)
        assert reply.http_version == "HTTP/2"
        assert reply.json()["choices"][0]["message"]["content"] == expected
    url, ca_pem = tls_server
    tls = ssl.create_default_context(cafile=ca_pem)
    with httpx.Client(http2=True, verify=tls, timeout=120) as h2:  # TLS, negotiated by ALPN
        replies = [h2.post(f"{url}/v1/chat/completions", json=body) for _ in range(2)]
        assert {r.http_version for r in replies} == {"HTTP/2"}
        assert {r.json()["choices"][0]["message"]["content"] for r in replies} == {expected}


def test_streaming_text_and_usage_equal_non_streaming_and_are_exact(server, client):
    plain = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=24
    )
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()

    tokenize = httpx.post(
        f"{server.url}/tokenize", json={"model": DEFAULT_MODEL, "messages": QUESTION}, timeout=60
    ).json()
    answer_tokens = httpx.post(
        f"{server.url}/tokenize",
        json={
            "model": DEFAULT_MODEL,
            "prompt": plain.choices[0].message.content,
            "add_special_tokens": False,
        },
        timeout=60,
    ).json()
    assert plain.usage.prompt_tokens == tokenize["count"]
    # the answer's tokens plus the end-of-turn token that stopped it
    assert plain.usage.completion_tokens == answer_tokens["count"] + 1
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens


def test_completions_stop_at_max_tokens(client):
    completion = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].text.strip()


def accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "runtime_asyncio"],
        [str(Path(sys.executable).with_name("sansllm")), "serve", "--runtime", "trio"],
    ],
    ids=["python-m-runtime_asyncio", "sansllm-serve-trio"],
)
def test_cli_serves_and_drains_20_streams_on_sigterm(command, tmp_path):
    """SIGTERM during 20 streams: all 20 finish, /health answers 503 and new requests get a 503
    meanwhile, and the process exits 0."""
    uds = tmp_path / "sansllm.sock"
    process = subprocess.Popen(
        [*command, DEFAULT_MODEL, "--uds", str(uds), *FLAGS, "--log-level", "warning"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # the socket listens before the model loads: wait for that, then the request waits for the load
        while not accepts_connections(uds):
            try:
                process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail("the server exited:\n" + process.stdout.read().decode()[-4000:])
        http_client = httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), timeout=300)
        with openai.OpenAI(
            base_url="http://sansllm/v1", api_key="x", http_client=http_client, max_retries=0
        ) as client:
            try:
                completion = client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=QUESTION, temperature=0
                )
            except openai.APIConnectionError:
                process.kill()
                pytest.fail("the server died:\n" + process.communicate()[0].decode()[-4000:])
            assert "Paris" in completion.choices[0].message.content
            streams = UdsStreams(uds, 20)
            assert streams.started()
            process.send_signal(signal.SIGTERM)
            health = http_client.get("http://sansllm/health")
            while health.status_code == 200:  # until the signal is handled
                health = http_client.get("http://sansllm/health")
            assert health.status_code == 503
            refused = http_client.post("http://sansllm/v1/chat/completions", json={"model": DEFAULT_MODEL, "messages": QUESTION})
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            assert streams.join()
        output = process.communicate(timeout=60)[0].decode()
        assert process.returncode == 0, output
        assert "Traceback" not in output
        assert streams.finish_reasons == [["length"]] * 20
        assert all(frames[-1] == "[DONE]" for frames in streams.frames)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class UdsStreams:
    """`count` greedy completion streams over a Unix socket, each on its own thread."""

    def __init__(self, uds: Path, count: int) -> None:
        self.uds = uds
        self.frames: list[list[str]] = [[] for _ in range(count)]
        self.finish_reasons: list[list[str]] = [[] for _ in range(count)]
        self._first = threading.Semaphore(0)
        self._threads = [threading.Thread(target=self._stream, args=(i,), daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def started(self, timeout: float = 120) -> bool:
        return all(self._first.acquire(timeout=timeout) for _ in self._threads)

    def join(self, timeout: float = 120) -> bool:
        for thread in self._threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    def _stream(self, i: int) -> None:
        body = {"model": DEFAULT_MODEL, "prompt": f"Count to {i + 3}:", "max_tokens": 40, "ignore_eos": True,
                "temperature": 0, "stream": True}
        with (
            httpx.Client(transport=httpx.HTTPTransport(uds=str(self.uds)), timeout=120) as http,
            http.stream("POST", "http://sansllm/v1/completions", json=body) as response,
        ):
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                frame = line[len("data: ") :]
                self.frames[i].append(frame)
                if len(self.frames[i]) == 1:
                    self._first.release()
                if frame != "[DONE]":
                    self.finish_reasons[i] += [c["finish_reason"] for c in json.loads(frame)["choices"] if c["finish_reason"]]


def test_beam_search_and_best_of_through_the_openai_client(client):
    """The engine's beam search and best_of reach the official client whole, streamed and not."""
    beams = client.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, n=2, temperature=0,
        extra_body={"use_beam_search": True},
    )  # fmt: skip
    assert [c.index for c in beams.choices] == [0, 1]
    assert beams.choices[0].text != beams.choices[1].text  # two distinct beams
    streamed = list(
        client.completions.create(
            model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=8, n=2, temperature=0,
            stream=True, extra_body={"use_beam_search": True},
        )
    )  # fmt: skip
    assert {(c.choices[0].index, c.choices[0].text) for c in streamed if c.choices} == {
        (c.index, c.text) for c in beams.choices
    }
    best = client.completions.create(
        model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=6, n=1, best_of=3, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in best.choices] == [0]
    assert best.usage.completion_tokens == 18  # every candidate's tokens are counted


def test_structured_output_through_the_openai_client(client):
    """Every spelling reaches the engine's guides, streamed or not, on chat and completions."""
    import json

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        },
        "required": ["city", "population"],
    }
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=QUESTION,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        temperature=0,
        max_tokens=60,
    )
    assert chat.choices[0].finish_reason == "stop", chat.choices[0].message.content
    place = json.loads(chat.choices[0].message.content)
    assert 0 <= place["population"] <= 99999999
    assert isinstance(place["city"], str) and isinstance(place["population"], int)
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=QUESTION,
        extra_body={"structured_outputs": {"choice": ["Paris", "London", "Rome"]}},
        temperature=1.0,
        seed=3,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("Paris", "London", "Rome")
    completion = client.completions.create(
        model=DEFAULT_MODEL,
        prompt="The year the Eiffel Tower opened:",
        extra_body={"guided_regex": r" 1[0-9]{3}\."},
        max_tokens=8,
        temperature=0,
    )
    assert re.fullmatch(r" 1[0-9]{3}\.", completion.choices[0].text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_constraint_that_cannot_compile_is_a_400_naming_why(client, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=QUESTION, extra_body={"guided_regex": "(unclosed"}, stream=stream
        )
    assert "The regex cannot be compiled: missing ), unterminated subpattern" in str(caught.value)


def test_whole_json_responses_carry_content_length_not_chunks(server):
    import socket as socket_module
    from urllib.parse import urlparse

    url = urlparse(server.url)
    body = b'{"model": "%s", "prompt": "Hi", "max_tokens": 2}' % DEFAULT_MODEL.encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body
    with socket_module.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(request)
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += sock.recv(65536)
        head, _, payload = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in header_lines)}
        while len(payload) < int(headers.get(b"content-length", b"0")):
            payload += sock.recv(65536)
    assert status_line.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in headers
    assert int(headers[b"content-length"]) == len(payload)
    assert json.loads(payload)["choices"][0]["finish_reason"] == "length"


def test_metrics_report_the_served_work_under_vllm_names(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    families = list(text_string_to_metric_families(text))
    samples = {
        (sample.name, sample.labels.get("model_name")): sample.value for family in families for sample in family.samples
    }
    http = {
        (sample.labels["handler"], sample.labels["status"]): sample.value
        for family in families
        for sample in family.samples
        if sample.name == "http_requests_total"
    }
    assert http[("/v1/completions", "2xx")] >= 1
    assert samples[("vllm:generation_tokens_total", DEFAULT_MODEL)] >= 3
    assert samples[("vllm:prompt_tokens_total", DEFAULT_MODEL)] >= 1
    assert samples[("vllm:num_requests_running", DEFAULT_MODEL)] == 0
    assert 0 <= samples[("vllm:kv_cache_usage_perc", DEFAULT_MODEL)] <= 1
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "inter_token_latency"):
        assert samples[(f"vllm:{histogram}_seconds_count", DEFAULT_MODEL)] >= 1, histogram
