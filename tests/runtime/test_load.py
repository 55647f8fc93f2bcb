"""Load: 256 concurrent streaming clients against SmolLM2-135M, under both runtimes.

Every request either completes (a finish reason, and usage that counts exactly the tokens streamed)
or is shed at once with a 503 and `Retry-After` (admission control: `--max-num-queued-requests`);
nothing else, and nothing hangs. No token is lost or duplicated: with `return_token_ids`, a
stream's text deltas join to exactly the text of its token ids, whose count is the usage's
`completion_tokens`. Under `--batch-invariant`, each greedy stream served among 255 others gives
the tokens of the same request served alone. Afterwards the engine's own counters show nothing
running, nothing waiting and no KV block held (blocks kept only for the prefix cache are free).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sansllm.args import DEFAULT_MODEL, parse_serve_args
from sansllm.assemble import build_asgi_app, engine_config_from_args
from tests.runtime.server import BRIDGES, RUNTIMES, ServerThread

pytestmark = pytest.mark.e2e

CLIENTS = 256
DISTINCT = 8  # greedy requests served alone, then cycled over under load
DEADLINE_S = 240.0  # the whole burst; a hang fails the test instead of stalling the run
# 64 sequences decode at once and 48 more may wait: of 256 clients arriving together, many are shed
FLAGS = [
    "--max-model-len", "1k", "--kv-cache-memory", "512M",
    "--max-num-seqs", "64", "--max-num-queued-requests", "48",
]  # fmt: skip
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "A haiku about autumn leaves:",
    "To make a cup of tea, first",
    "The largest planet in our solar system",
    "Water boils at",
]
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "What does CPU stand for?",
]


@dataclass
class Outcome:
    """What one client saw: a 200 stream (chunks parsed) or a refusal."""

    status: int
    retry_after: str | None = None
    error: dict | None = None
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict | None = None
    prompt_token_ids: list[int] | None = None
    stream_errors: list[dict] = field(default_factory=list)
    done: bool = False


def request_for(i: int, *, greedy: bool) -> tuple[str, dict]:
    """Client i's request: completions or chat, 8 to 24 tokens, greedy or sampled with a seed."""
    body: dict = {
        "model": DEFAULT_MODEL,
        "max_tokens": 8 + i % 17,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    body.update({"temperature": 0} if greedy else {"temperature": 1.0, "seed": i})
    if i % 2:
        return "/v1/chat/completions", {
            **body,
            "messages": [{"role": "user", "content": QUESTIONS[i // 2 % 8]}],
        }
    return "/v1/completions", {**body, "prompt": PROMPTS[i // 2 % 8]}


async def stream(client: httpx.AsyncClient, url: str, body: dict) -> Outcome:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            payload = await response.aread()
            return Outcome(response.status_code, response.headers.get("retry-after"), json.loads(payload))
        outcome = Outcome(200)
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line.removeprefix("data: ")
            assert not outcome.done, f"data after [DONE]: {data}"
            if data == "[DONE]":
                outcome.done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                outcome.stream_errors.append(chunk["error"])
                continue
            if chunk.get("prompt_token_ids") is not None:
                outcome.prompt_token_ids = chunk["prompt_token_ids"]
            if chunk.get("usage"):
                outcome.usage = chunk["usage"]
            for choice in chunk["choices"]:
                assert choice["index"] == 0
                text = choice["text"] if "text" in choice else choice["delta"].get("content")
                outcome.texts.append(text or "")
                outcome.token_ids += choice.get("token_ids") or []
                if choice.get("prompt_token_ids") is not None:
                    outcome.prompt_token_ids = choice["prompt_token_ids"]
                if choice.get("finish_reason") is not None:
                    outcome.finish_reasons.append(choice["finish_reason"])
        return outcome


def burst(base_url: str, requests: list[tuple[str, dict]]) -> tuple[list[Outcome], float]:
    """All `requests` at once, each on its own connection; their outcomes and the wall time."""

    async def run() -> list[Outcome]:
        limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=DEADLINE_S) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(stream(client, path, body) for path, body in requests)), DEADLINE_S
            )

    started = time.perf_counter()
    outcomes = asyncio.run(run())
    return outcomes, time.perf_counter() - started


def serve(loaded, runtime: str, flags: list[str]):
    from engine import Engine, EngineConfig

    args = parse_serve_args([DEFAULT_MODEL, *FLAGS, *flags], environ={})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    engine = Engine(config, loaded=loaded)
    return engine, ServerThread(build_asgi_app(args, [engine], BRIDGES[runtime]), runtime)


def load_weights():
    from engine import load_model, resolve_model

    return load_model(resolve_model(DEFAULT_MODEL), "auto", "auto", False)


@pytest.fixture(scope="module")
def weights():
    return load_weights()


@pytest.fixture(scope="module")
def unpacked_weights():
    """Weights of their own for `--batch-invariant`: a served model's are packed for speed, which the
    batch-invariant kernels cannot use."""
    return load_weights()


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, weights):
    engine, thread = serve(weights, request.param, [])
    with thread as running:
        yield running, engine, weights.tokenizer


@pytest.fixture(scope="module", params=RUNTIMES)
def invariant_server(request, unpacked_weights):
    """A server with `--batch-invariant`; the mode is process-wide, and is turned off after."""
    import kernels

    try:
        engine, thread = serve(unpacked_weights, request.param, ["--batch-invariant"])
        with thread as running:
            yield running, engine, unpacked_weights.tokenizer
    finally:
        kernels.set_batch_invariant(False)


def assert_complete_or_shed(outcomes: list[Outcome], requests: list[tuple[str, dict]], tokenizer) -> Counter:
    kinds: Counter = Counter()
    for i, (outcome, (_, body)) in enumerate(zip(outcomes, requests, strict=True)):
        if outcome.status == 503:
            assert outcome.retry_after is not None, i
            assert "capacity" in outcome.error["error"]["message"], outcome.error
            kinds["shed"] += 1
            continue
        assert outcome.status == 200, (i, outcome.status, outcome.error)
        assert outcome.stream_errors == [], (i, outcome.stream_errors)
        assert outcome.done, i
        assert len(outcome.finish_reasons) == 1 and outcome.finish_reasons[0] in ("stop", "length"), outcome
        # no token lost or duplicated: the text is exactly that of the token ids, counted by usage
        assert "".join(outcome.texts) == tokenizer.decode(outcome.token_ids, skip_special_tokens=True), i
        assert outcome.usage["completion_tokens"] == len(outcome.token_ids), i
        assert outcome.usage["prompt_tokens"] == len(outcome.prompt_token_ids), i
        if outcome.finish_reasons[0] == "length":
            assert len(outcome.token_ids) == body["max_tokens"], i
        else:
            assert 0 < len(outcome.token_ids) <= body["max_tokens"], i
        kinds["completed"] += 1
    return kinds


def metrics_of(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def assert_nothing_held(server, engine) -> None:
    """The engine's own counters (as of its last step): nothing running or waiting, no block held
    (blocks kept only for the prefix cache are free); /metrics says the same."""
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    metrics = metrics_of(server.url)
    labels = (("engine", "0"), ("model_name", DEFAULT_MODEL))
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert metrics[(gauge, labels)] == 0, gauge


def server_errors(server) -> float:
    """5xx responses the server counted (503s included)."""
    return sum(
        value
        for (name, labels), value in metrics_of(server.url).items()
        if name == "http_requests_total" and ("status", "5xx") in labels
    )


def test_256_streams_each_complete_exactly_or_are_shed_and_no_block_leaks(server):
    running, engine, tokenizer = server
    requests = [request_for(i, greedy=i % 4 < 2) for i in range(CLIENTS)]
    outcomes, seconds = burst(running.url, requests)
    kinds = assert_complete_or_shed(outcomes, requests, tokenizer)
    print(f"\n{CLIENTS} streams in {seconds:.1f} s: {dict(kinds)}")
    assert kinds["completed"] > 0 and kinds["shed"] > 0  # the limit was reached, and work still went on
    assert server_errors(running) == kinds["shed"]  # the 503s, and no other server error
    assert_nothing_held(running, engine)
    # and the server still serves
    after, _ = burst(running.url, [request_for(0, greedy=True)])
    assert after[0].status == 200 and after[0].finish_reasons


def test_batch_invariant_greedy_streams_under_load_equal_each_served_alone(invariant_server):
    running, engine, tokenizer = invariant_server
    distinct = [request_for(i, greedy=True) for i in range(DISTINCT)]
    alone, differ = [], []
    for d, request in enumerate(distinct):
        # served alone twice: the second time its prompt comes from the prefix cache
        first, again = (burst(running.url, [request])[0][0] for _ in range(2))
        assert first.status == again.status == 200 and first.finish_reasons, first
        alone.append(first.token_ids)
        if again.token_ids != first.token_ids:
            differ.append(("alone again", d, first.token_ids, again.token_ids))
    # every other client greedy (cycling over the distinct requests), the rest sampled
    requests = [
        distinct[i // 2 % DISTINCT] if i % 2 == 0 else request_for(i, greedy=False) for i in range(CLIENTS)
    ]
    outcomes, seconds = burst(running.url, requests)
    kinds = assert_complete_or_shed(outcomes, requests, tokenizer)
    print(f"\n{CLIENTS} streams in {seconds:.1f} s under --batch-invariant: {dict(kinds)}")
    assert_nothing_held(running, engine)
    greedy = [(i // 2 % DISTINCT, o) for i, o in enumerate(outcomes) if i % 2 == 0 and o.status == 200]
    assert greedy, "every greedy stream was shed"
    differ += [("under load", d, alone[d], o.token_ids) for d, o in greedy if o.token_ids != alone[d]]
    assert not differ, f"{len(differ)} streams differ, first: {differ[0]}"
