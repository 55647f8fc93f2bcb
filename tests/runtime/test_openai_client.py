"""The official `openai` client against the assembled server (real core, scripted engine), both runtimes.

The server is built by `sansllm.assemble.build_asgi_app` from parsed `serve` flags, exactly as the
CLI builds it; only the engine is the fast scripted one (ByteTokenizer, canned reply).
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app
from tests.runtime.fakes import ScriptedEngine
from tests.runtime.server import BRIDGES, ServerThread, client_ssl_context

MODEL = "scripted-model"
REPLY = "Paris, of course."
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def serve(runtime: str, *flags: str, engine: ScriptedEngine | None = None, **server_options) -> ServerThread:
    engine = engine or ScriptedEngine(reply=REPLY)
    args = parse_serve_args([MODEL, *flags], environ={})
    asgi_app = build_asgi_app(args, [engine], BRIDGES[runtime], clock=lambda: 1_700_000_000.0)
    return ServerThread(asgi_app, runtime, **server_options)


def client_for(server: ServerThread, api_key: str = "unused", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=30, **options)


def prompt_tokens(server: ServerThread) -> int:
    response = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": MESSAGES}, timeout=30)
    return response.json()["count"]


def test_sync_chat_non_streaming_and_streaming(runtime):
    with serve(runtime) as server, client_for(server) as client:
        completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.choices[0].message.content == REPLY
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.model == MODEL
        assert completion.created == 1_700_000_000
        expected_prompt = prompt_tokens(server)
        # the reply's bytes plus the EOS token that ended it
        assert completion.usage.completion_tokens == len(REPLY.encode()) + 1
        assert completion.usage.prompt_tokens == expected_prompt
        assert completion.usage.total_tokens == expected_prompt + len(REPLY.encode()) + 1

        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text == REPLY
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "stop"
        ]
        assert chunks[-1].choices == []
        assert chunks[-1].usage.model_dump() == completion.usage.model_dump()


def test_async_completions_non_streaming_and_streaming(runtime):
    async def run(url: str):
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            plain = await client.completions.create(
                model=MODEL, prompt="The capital of France is", max_tokens=5
            )
            stream = await client.completions.create(
                model=MODEL, prompt="The capital of France is", max_tokens=5, stream=True
            )
            pieces = [chunk.choices[0].text async for chunk in stream]
            return plain, pieces

    with serve(runtime) as server:
        plain, pieces = asyncio.run(run(server.url))
    assert plain.choices[0].text == REPLY[:5]
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 5
    assert "".join(pieces) == REPLY[:5]


def test_openai_client_over_http2_with_tls(runtime, ca, server_pem):
    # (the client closes its connection before the server stops: under asyncio, hypercorn waits up to
    # 30 s for an idle TLS peer's close_notify when it shuts down)
    with (
        serve(runtime, tls_pem=server_pem) as server,
        client_for(server, http_client=httpx.Client(http2=True, verify=client_ssl_context(ca))) as client,
    ):
        response = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        assert response.http_response.http_version == "HTTP/2"
        assert response.parse().choices[0].message.content == REPLY


def test_api_key_is_required_when_configured(runtime):
    with (
        serve(runtime, "--api-key", "sesame") as server,
        client_for(server, api_key="wrong") as wrong,
        client_for(server, api_key="sesame") as right,
    ):
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=MESSAGES)
        completion = right.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.choices[0].message.content == REPLY
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # not behind the key


def test_served_model_names_and_root_path(runtime):
    with (
        serve(runtime, "--served-model-name", "alias", "other", "--root-path", "/llm") as server,
        client_for(server) as client,
        openai.OpenAI(base_url=f"{server.url}/llm/v1", api_key="x", max_retries=0) as under_root,
    ):
        assert [model.id for model in client.models.list().data] == ["alias"]
        completion = under_root.chat.completions.create(model="other", messages=MESSAGES)
        assert completion.model == "alias"
        assert completion.choices[0].message.content == REPLY


def test_disconnect_mid_stream_aborts_the_engine_request(runtime):
    engine = ScriptedEngine(reply=REPLY, hold_after=2)
    with serve(runtime, engine=engine) as server, client_for(server) as client:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        stream.close()
        (generate,) = [command for command in engine.received if type(command).__name__ == "Generate"]
        assert engine.aborted.get(timeout=10) == generate.request_id


def test_engine_death_gives_503_health(runtime):
    engine = ScriptedEngine(reply=REPLY)
    with serve(runtime, engine=engine) as server:
        engine.healthy = False
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
