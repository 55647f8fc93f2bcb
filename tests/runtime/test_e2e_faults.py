"""Engine faults through the served stack, SmolLM2 under both runtimes: a request that breaks the
model fails alone (500 naming it) while the others finish; a fault on every step restarts the
engine, /health answers 503 until it is back, then requests succeed. No exception text reaches a
client."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sansllm.args import DEFAULT_MODEL, parse_serve_args
from sansllm.assemble import build_asgi_app, engine_config_from_args
from tests.runtime.server import BRIDGES, RUNTIMES, ServerThread

pytestmark = pytest.mark.e2e

SECRET = "injected fault: secret-internal-detail"


@pytest.fixture(scope="module")
def loaded_model():
    from engine import load_model, resolve_model

    return load_model(resolve_model(DEFAULT_MODEL), "auto", "auto", False)


@pytest.fixture(params=RUNTIMES)
def served(request, loaded_model):
    from engine import Engine, EngineConfig

    args = parse_serve_args([DEFAULT_MODEL, "--max-model-len", "1k"], environ={})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    engine = Engine(config, loaded=loaded_model)
    with ServerThread(build_asgi_app(args, [engine], BRIDGES[request.param]), request.param) as server:
        yield server, engine


def complete(url: str, prompt: str) -> httpx.Response:
    body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_a_request_that_breaks_the_model_fails_alone(served):
    server, engine = served
    prompts = ["The capital of France is", "Zebras quagga xylophone", "One, two, three,"]
    expected = {p: complete(server.url, p).json()["choices"][0]["text"] for p in prompts if "Zebras" not in p}
    tokenized = httpx.post(f"{server.url}/tokenize", json={"model": DEFAULT_MODEL, "prompt": prompts[1]}, timeout=30)
    poison = tokenized.json()["tokens"][-1]
    forward = engine.core.runner.forward

    def poisoned(spans, *args, **kwargs):
        if any(poison in span.token_ids for span in spans):
            raise RuntimeError(SECRET)
        return forward(spans, *args, **kwargs)

    engine.core.runner.forward = poisoned
    with ThreadPoolExecutor(3) as pool:
        answers = dict(zip(prompts, pool.map(lambda p: complete(server.url, p), prompts), strict=True))
    failed = answers.pop(prompts[1])
    assert failed.status_code == 500
    assert failed.json()["error"]["message"].startswith("Internal server error while serving request cmpl-")
    assert SECRET not in failed.text
    assert {p: r.json()["choices"][0]["text"] for p, r in answers.items()} == expected
    assert engine.restarts == 0 and httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_fault_on_every_step_restarts_the_engine_with_health_503_meanwhile(served):
    server, engine = served

    def broken(*args, **kwargs):
        raise RuntimeError(SECRET)

    engine.core.runner.forward = broken
    rebuild, began, release = engine._build_decoder, threading.Event(), threading.Event()

    def held_rebuild(*args, **kwargs):  # holds the restart until /health has been seen
        began.set()
        release.wait(60)
        return rebuild(*args, **kwargs)

    engine._build_decoder = held_rebuild
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(complete, server.url, p) for p in ("Hello there", "Good morning")]
        assert began.wait(60)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        release.set()
        failed = [future.result() for future in pending]
    assert [r.status_code for r in failed] == [500, 500]
    assert all(SECRET not in r.text for r in failed)
    assert engine.restarts == 1
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    served_again = complete(server.url, "The capital of France is")
    assert served_again.status_code == 200 and served_again.json()["usage"]["completion_tokens"] == 6
