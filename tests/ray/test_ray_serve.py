"""sansllm on a local Ray cluster: two SmolLM2 replicas behind the ingress, through the openai client.

Run by `make test-ray` (which `.ci/run` calls after `make test`): the default suite does not
collect this folder, as it needs the `ray` extra and ~3 minutes. The cluster is one local node on
127.0.0.1 with 2 CPUs (one per engine replica: one torch thread each), a 256 MiB object store and
256 MiB of KV cache per replica.

Shows: the OpenAI API unchanged through Ray (streaming and not); both replicas serve; requests
sharing a ~500-token system prompt stay on one replica and report cached tokens, against Ray's
power-of-two routing (random here) on a fresh deployment (both cached-token ratios are printed); a replica
killed mid-run loses no request whose response had not started, and Ray replaces it; shutting
Serve and Ray down leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from sansllm.serve_ray import build_app

MODEL = "SmolLM2-135M-Instruct"
APP = "sansllm"
SERVE_ARGS = "--max-model-len 2048 --kv-cache-memory 256M --enable-prompt-tokens-details"
DEPLOY_TIMEOUT_S = 300


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    port = _free_port()
    ray.init(
        num_cpus=2,
        object_store_memory=256 << 20,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    assert _listening_on(port) == {"127.0.0.1"}, "the OpenAI API is served on loopback only"
    yield f"http://127.0.0.1:{port}"
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def _listening_on(port: int) -> set[str]:
    """The local addresses a TCP port is listened on (from /proc/net/tcp and tcp6)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                if len(address) == 8:
                    addresses.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
                else:
                    addresses.add("::" if int(address, 16) == 0 else address)
    return addresses


def deploy(routing: str) -> None:
    """(Re)deploy the app with fresh replicas (cold caches) and wait until it serves."""
    app = build_app({"model": MODEL, "serve_args": SERVE_ARGS, "num_replicas": "2", "routing": routing})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while serve.status().applications[APP].status != "RUNNING":
        assert time.monotonic() < deadline, f"not running after {DEPLOY_TIMEOUT_S} s: {serve.status()}"
        time.sleep(0.5)  # polling Ray's status: there is no event to wait on


def engine_replicas() -> dict[str, str]:
    """Live engine replicas: replica id -> Ray actor name."""
    names = ray.util.list_named_actors(all_namespaces=True)
    replicas = {}
    for entry in names:
        name = entry["name"]
        if name.startswith("SERVE_REPLICA::") and "SansllmEngine" in name:
            replicas[name.rsplit("#", 1)[1]] = name
    return replicas


def system_prompt(index: int) -> str:
    """About 500 tokens of text of its own from the first character on."""
    words = random.Random(index).choices(
        "river mountain table window garden yellow quiet number letter silver forest engine coffee "
        "paper cloud morning doctor island planet market winter signal bridge orange".split(),
        k=420,
    )
    return f"Assistant {index}. Use these notes when answering: " + " ".join(words)


async def chat(client: openai.AsyncOpenAI, system: str, question: str, max_tokens: int = 8):
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return raw.headers["x-sansllm-replica"], raw.parse()


def test_openai_client_streaming_and_not(cluster):
    deploy("prefix")
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="none", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=MODEL, messages=question, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == "The capital of France is Paris."
    stream = client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The capital of France is Paris."
    assert chunks[-1].usage.completion_tokens == 8
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert completion.usage.completion_tokens == 5
    assert [m.id for m in client.models.list().data] == [MODEL]
    broken = httpx.post(f"{cluster}/v1/chat/completions", content=b"{not json", timeout=30)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == 400, broken.text
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=question, max_tokens=-1)

    async def spread() -> Counter[str]:
        async with openai.AsyncOpenAI(base_url=f"{cluster}/v1", api_key="none", max_retries=0) as aclient:
            answers = await asyncio.gather(*(chat(aclient, f"You are helper {i}.", "Hi!") for i in range(16)))
        return Counter(replica for replica, _ in answers)

    served = asyncio.run(spread())
    engines = serve.get_deployment_handle("SansllmEngine", APP)
    states = {state["replica"]: state for state in (engines.describe.remote().result() for _ in range(12))}
    assert {state["torch_threads"] for state in states.values()} == {1}, "one thread per replica (num_cpus=1)"
    print(f"\n16 short chats by replica: {dict(served)}")
    assert set(served) == set(engine_replicas()), "both replicas serve requests"


def test_killed_replica_loses_no_request_that_had_not_started(cluster):
    before = engine_replicas()
    assert len(before) == 2
    ingress = serve.get_deployment_handle("SansllmIngress", APP)

    async def run() -> tuple[list, list]:
        async with openai.AsyncOpenAI(base_url=f"{cluster}/v1", api_key="none", max_retries=0) as client:
            started = asyncio.Event()
            victim: list[str] = []

            async def streamed(i: int) -> tuple[str, str | BaseException]:
                raw = await client.completions.with_raw_response.create(
                    model=MODEL, prompt=f"Story {i}: once upon a time", max_tokens=150, temperature=0,
                    stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
                replica = raw.headers["x-sansllm-replica"]
                try:
                    async for _chunk in raw.parse():
                        if not victim:
                            victim.append(replica)
                            started.set()
                    return replica, "done"
                except openai.APIError as exc:
                    return replica, exc

            async def whole(i: int) -> str:
                answer = await client.completions.create(
                    model=MODEL, prompt=f"List {i}: apples, pears,", max_tokens=40, temperature=0,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                assert answer.usage.completion_tokens == 40
                return answer.choices[0].text

            streams = [asyncio.ensure_future(streamed(i)) for i in range(4)]
            await started.wait()
            wholes = [asyncio.ensure_future(whole(i)) for i in range(10)]
            deadline = time.monotonic() + 60
            while (await ingress.relay_stats.remote())["in_flight"] < 14:  # all forwarded to a replica
                assert time.monotonic() < deadline, "the ingress did not forward the requests"
            ray.kill(ray.get_actor(before[victim[0]], namespace="serve"), no_restart=True)
            print(f"\nkilled replica {victim[0]}")
            return await asyncio.gather(*streams), await asyncio.gather(*wholes, return_exceptions=True)

    streams, wholes = asyncio.run(run())
    failures = [result for result in wholes if isinstance(result, BaseException)]
    assert not failures, f"requests that had not started were lost: {failures}"
    for replica, outcome in streams:
        # a stream on the survivor finishes; one cut on the killed replica ends with an error frame
        assert outcome == "done" or replica not in engine_replicas(), (replica, outcome)
    cut = sum(1 for _, outcome in streams if outcome != "done")
    resent = ingress.relay_stats.remote().result()["resent"]
    print(f"streams cut with the killed replica: {cut} of {len(streams)}; 10 whole requests all answered, "
          f"{resent} of them resent to the survivor")  # fmt: skip
    assert cut >= 1 and resent >= 1, "the killed replica was serving requests"

    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        now = engine_replicas()
        status = serve.status().applications[APP].deployments["SansllmEngine"]
        if len(now) == 2 and set(now) != set(before) and status.status == "HEALTHY":
            break
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {now}, {status}"
        time.sleep(0.5)  # polling Ray's status: there is no event to wait on
    print(f"replaced: {sorted(before)} -> {sorted(now)}")


def run_shared_prompt_workload(base_url: str, prompts: int = 6, rounds: int = 4) -> tuple[float, dict]:
    """`prompts` system prompts of ~500 tokens, each asked `rounds` questions, one request at a time
    (so both replicas are idle at each choice and Ray's power of two picks at random); returns the
    cached share of all prompt tokens and the replicas each system prompt went to."""

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0) as client:
            results = []
            for question in range(rounds):
                for index in range(prompts):
                    replica, answer = await chat(client, system_prompt(index), f"Question {question}: why?")
                    results.append((index, replica, answer.usage))
            return results

    results = asyncio.run(run())
    cached = sum(_cached(usage) for _, _, usage in results)
    total = sum(usage.prompt_tokens for _, _, usage in results)
    placement: dict[int, set[str]] = {}
    for index, replica, _ in results:
        placement.setdefault(index, set()).add(replica)
    assert all(usage.prompt_tokens > 450 for _, _, usage in results)
    return cached / total, placement


def _cached(usage) -> int:
    """Cached prompt tokens (the details are left out when none were cached, as vLLM does)."""
    return usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0


def test_a_client_leaving_mid_stream_stops_its_engine_work(cluster):
    """Ray's proxy cancels the ingress's call, which cancels the replica's, whose app aborts the work."""
    engines = serve.get_deployment_handle("SansllmEngine", APP)
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 1900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{cluster}/v1/completions", json=body, timeout=60) as response:
        replica = response.headers["x-sansllm-replica"]
        next(response.iter_lines())  # the stream runs: ~1900 tokens would take a minute here
    deadline = time.monotonic() + 30
    while True:  # ask both replicas (random routing) until the one that streamed reports no work
        state = engines.describe.remote().result()
        if state["replica"] == replica and state["requests_in_engine"] == 0:
            break
        assert time.monotonic() < deadline, f"replica {replica} still runs the abandoned request"


def test_shared_system_prompts_stay_on_their_replica_unlike_random_routing(cluster):
    prefix_ratio, prefix_placement = run_shared_prompt_workload(cluster)
    deploy("pow2")  # fresh replicas, Ray's default routing: the less loaded of two random replicas
    random_ratio, random_placement = run_shared_prompt_workload(cluster)
    print(
        f"\ncached-token ratio, 6 system prompts x 4 questions over 2 replicas: prefix routing "
        f"{prefix_ratio:.3f}, Ray's power-of-two routing {random_ratio:.3f}\n"
        f"replicas per system prompt: prefix {[len(r) for r in prefix_placement.values()]}, "
        f"power-of-two {[len(r) for r in random_placement.values()]}"
    )
    assert all(len(replicas) == 1 for replicas in prefix_placement.values())
    assert len(set().union(*prefix_placement.values())) == 2, "the prompts are spread over both replicas"
    assert prefix_ratio > 0.6  # 3 of 4 requests per prompt find its ~500 tokens cached
    assert prefix_ratio > random_ratio + 0.05


def test_proxy_direct_mode_serves_the_same_api(cluster):
    """`ingress=false`: Ray's proxy calls the replicas' ASGI app itself (power-of-two routing)."""
    app = build_app({"model": MODEL, "serve_args": SERVE_ARGS, "ingress": "false", "routing": "pow2"})
    serve.run(app, name=APP, route_prefix="/")
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="none", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=MODEL, messages=question, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == "The capital of France is Paris."
    stream = client.chat.completions.create(model=MODEL, messages=question, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "The capital of France is Paris."
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=question)


def test_removing_the_app_lets_a_stream_in_flight_finish(cluster):
    """Ray stops replicas gracefully (scale-down, redeploy, delete): no new requests reach them, the
    ones in flight finish (within graceful_shutdown_timeout_s), then the engines stop."""
    deploy("prefix")
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="none", max_retries=0)
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=300, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    next(chunks)
    deleter = threading.Thread(target=serve.delete, args=(APP,), daemon=True)
    deleter.start()
    deadline = time.monotonic() + 60
    while serve.status().applications[APP].status != "DELETING":
        assert time.monotonic() < deadline, "Ray did not start removing the app"
        time.sleep(0.1)  # polling Ray's status: there is no event to wait on
    rest = list(chunks)
    assert rest[-1].usage.completion_tokens == 300, "the stream ran to its end while the app was removed"
    deleter.join(timeout=120)
    assert APP not in serve.status().applications


def test_the_health_check_fails_once_an_engine_stopped():
    from types import SimpleNamespace

    from sansllm.serve_ray.app import _EngineReplicaBase

    replica = _EngineReplicaBase()  # no engine: just the check Ray calls on both replica kinds
    replica.replica_id, replica.server = "r1", SimpleNamespace(healthy=True)
    replica.check_health()
    replica.server.healthy = False
    with pytest.raises(RuntimeError, match="engine thread stopped"):
        replica.check_health()


SHELL_COMMANDS = {
    "sansllm serve --ray": ["sansllm", "serve", MODEL, "--ray", "--ray-replicas", "1", "--max-model-len", "1024",
                            "--ray-option", "num_cpus=1"],
    "serve run": ["serve", "run", "sansllm.serve_ray:build_app", f"model={MODEL}", "num_replicas=1", "num_cpus=1",
                  "serve_args=--max-model-len 1024"],
}  # fmt: skip


@pytest.mark.parametrize("how", list(SHELL_COMMANDS))
def test_deploying_from_a_shell_on_the_running_cluster(cluster, how):
    """`sansllm serve --ray` and Ray's own `serve run` with our builder, joining the cluster by
    $RAY_ADDRESS; Ctrl-C takes the deployment down."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    program, *rest = SHELL_COMMANDS[how]
    command = [str(Path(sys.executable).with_name(program)), *rest]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    try:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while not _serving(cluster, max_model_len=1024):
            assert process.poll() is None, process.stderr.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"{how} did not deploy"
            time.sleep(0.5)  # polling the proxy: the subprocess gives no signal when it is up
        client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="none", max_retries=0)
        answer = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens == 4
    finally:
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=120)
    assert returncode in (0, 1, -signal.SIGINT), process.stderr.read().decode(errors="replace")[-3000:]
    assert not _serving(cluster, max_model_len=1024), "Ctrl-C took the deployment down"


def _serving(base_url: str, max_model_len: int) -> bool:
    try:
        models = httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return [model.get("max_model_len") for model in models] == [max_model_len]


def test_shutdown_leaves_no_process(cluster):
    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    serve.shutdown()
    ray.shutdown()
    deadline = time.monotonic() + 60
    while left := _processes_of(session):
        assert time.monotonic() < deadline, f"processes left after shutdown: {left}"
        time.sleep(0.2)  # polling /proc: the processes exit on their own time


def _processes_of(session: str) -> list[str]:
    """Command lines of live processes started for this Ray session (or Ray workers at all)."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if state != "Z" and (session in cmdline or cmdline.startswith("ray::") or "default_worker.py" in cmdline):
            left.append(cmdline[:120])
    return left
