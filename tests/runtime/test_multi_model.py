"""Several models in one server: assembled from `serve` flags as the CLI does, over fake engines.

Each fake engine answers with its own canned reply, so a reply shows which engine served a request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from protocol.engine_api import Generate
from protocol.model import PoolingInfo
from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app, served_model
from tests.runtime.fakes import ScriptedEngine
from tests.runtime.server import BRIDGES, ServerThread

CREATED = 1_700_000_000
MESSAGES = [{"role": "user", "content": "Who are you?"}]


@dataclass(frozen=True)
class Pooling:
    """The pooling facts an engine reports for an embedding model (the engine contract's names)."""

    hidden_size: int = 384
    is_matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None
    num_labels: int = 0
    id2label: dict = field(default_factory=dict)




def embedding_engine() -> ScriptedEngine:
    return ScriptedEngine(reply="never", model_name="embedder", tasks=frozenset({"embed"}), pooling=Pooling())


FLAGS = [
    "chat-a",
    "--served-model-name", "a", "alias-a",
    "--model", "chat-b",
    "--model", json.dumps({"model": "embedder", "served_model_name": ["embed", "minilm"]}),
]  # fmt: skip


def serve(runtime: str, engines: list[ScriptedEngine]) -> ServerThread:
    args = parse_serve_args(FLAGS, environ={})
    asgi_app = build_asgi_app(args, engines, BRIDGES[runtime], clock=lambda: float(CREATED))
    return ServerThread(asgi_app, runtime)


def chat(client: openai.OpenAI, model: str) -> str | None:
    return client.chat.completions.create(model=model, messages=MESSAGES).choices[0].message.content


def generates(engine: ScriptedEngine) -> int:
    return sum(isinstance(command, Generate) for command in engine.received)


def test_one_server_lists_every_model_and_routes_by_name(runtime, caplog):
    engine_a = ScriptedEngine(reply="I am A.", model_name="chat-a")
    engine_b = ScriptedEngine(reply="I am B.", model_name="chat-b")
    embedder = embedding_engine()
    with caplog.at_level(logging.INFO, logger="sansllm.assemble"):
        server_thread = serve(runtime, [engine_a, engine_b, embedder])
    assert "serving chat-a as 'a', 'alias-a': tasks generate, max_model_len 256" in caplog.text
    assert "serving chat-b as 'chat-b': tasks generate" in caplog.text
    assert "serving embedder as 'embed', 'minilm': tasks embed" in caplog.text
    with (
        server_thread as server,
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as client,
    ):
        cards = client.models.list().data
        assert [(card.id, card.root, card.created) for card in cards] == [
            ("a", "chat-a", CREATED),
            ("chat-b", "chat-b", CREATED),
            ("embed", "embedder", CREATED),
        ]

        assert chat(client, "a") == "I am A."
        assert chat(client, "alias-a") == "I am A."
        assert chat(client, "chat-b") == "I am B."
        reply = client.chat.completions.create(model="alias-a", messages=MESSAGES)
        assert reply.model == "a"  # the first name is reported

        # no model: the first one (as vLLM)
        plain = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
        assert plain.status_code == 200
        assert plain.json()["choices"][0]["message"]["content"] == "I am A."

        # chat goes to generative models only; the embedding model refuses it
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, "minilm")
        assert "does not support Chat Completions API" in refused.value.message
        with pytest.raises(openai.NotFoundError, match="The model `embedder` does not exist"):
            chat(client, "embedder")  # its spec's name is not one of its served names

        assert (generates(engine_a), generates(engine_b), generates(embedder)) == (4, 1, 0)
    assert engine_a.stopped.is_set() and engine_b.stopped.is_set() and embedder.stopped.is_set()


def test_served_models_carry_each_engines_tasks_and_pooling_facts():
    args = parse_serve_args(FLAGS, environ={})
    matryoshka = ScriptedEngine(
        tasks=frozenset({"embed", "classify"}),
        pooling=Pooling(
            hidden_size=768,
            is_matryoshka=True,
            matryoshka_dimensions=[256, 768],
            num_labels=2,
            id2label={"0": "no", "1": "yes"},
        ),
    )
    model = served_model(args.models[2], matryoshka, created=CREATED)
    assert model.names == ["embed", "minilm"]
    assert model.tasks == frozenset({"embed", "classify"})
    assert model.pooling == PoolingInfo(
        hidden_size=768,
        is_matryoshka=True,
        matryoshka_dimensions=(256, 768),
        num_labels=2,
        id2label={0: "no", 1: "yes"},
    )
    generative = served_model(args.models[0], ScriptedEngine(), created=CREATED)
    assert (generative.names, generative.tasks, generative.pooling) == (["a", "alias-a"], {"generate"}, None)


def test_engines_must_match_the_models_one_to_one():
    args = parse_serve_args(FLAGS, environ={})
    with pytest.raises(ValueError, match=r"2 engine\(s\) for 3 models \(chat-a, chat-b, embedder\)"):
        build_asgi_app(args, [ScriptedEngine(), ScriptedEngine()], BRIDGES["asyncio"])
