"""`sansllm.asgi_factory.create_app()`: flags from $SANSLLM_ARGS, bridge picked for hypercorn's worker."""

from __future__ import annotations

import httpx
import openai

import sansllm.asgi_factory
from tests.runtime.fakes import ScriptedEngine
from tests.runtime.server import ServerThread


def test_factory_serves_under_either_worker_with_flags_from_the_environment(runtime, monkeypatch):
    engines: list[ScriptedEngine] = []

    def load_scripted(args):
        engines.append(ScriptedEngine(reply=f"served by {args.model}"))
        return engines

    monkeypatch.setattr(sansllm.asgi_factory, "load_engines", load_scripted)
    monkeypatch.setenv("SANSLLM_ARGS", "env-model --served-model-name 'my model' --api-key k")
    asgi_app = sansllm.asgi_factory.create_app()

    with (
        ServerThread(asgi_app, runtime) as server,
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as client,
    ):
        completion = client.chat.completions.create(
            model="my model", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content == "served by env-model"
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    assert engines[0].stopped.is_set()
