"""Tool calls and reasoning in chat answers, through the Sans-IO core with a scripted engine.

The engine's text is scripted; what is checked is what an `openai` client reads: `tool_calls` in
the message or in stream deltas (id and name once, argument fragments that join to JSON),
`reasoning`, `content`, and the finish reason (`tool_calls` for auto and required, `stop` for a
named choice).
"""

import itertools
import json

import pytest

from protocol import App, AppConfig
from protocol.testing import tiny_served_model
from tests.protocol.test_calls_chat import NOW, chat, script

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def app(**config):
    ids = itertools.count(1)
    return App(AppConfig(**config), [tiny_served_model()], clock=lambda: NOW, new_id=lambda: f"r{next(ids)}")


def hermes_app(**config):
    return app(enable_auto_tool_choice=True, tool_call_parser="hermes", **config)


def streamed_calls(events):
    """(calls joined per index, every tool-call delta) of a stream."""
    deltas = [
        call for e in events if e["choices"] for call in e["choices"][0]["delta"].get("tool_calls") or []
    ]
    calls: dict[int, dict] = {}
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"id": None, "name": None, "arguments": ""})
        function = delta.get("function") or {}
        if delta.get("id") is not None:
            assert call["id"] is None, "id sent twice"
            call["id"] = delta["id"]
        if function.get("name") is not None:
            assert call["name"] is None, "name sent twice"
            call["name"] = function["name"]
        call["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)], deltas


def finish_reason(events):
    reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(reasons) == 1
    return reasons[0]


# ---- tool_choice "auto" ----


@pytest.mark.parametrize("body", [{"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "auto"}])
def test_auto_tool_choice_without_a_parser_is_a_400_that_says_which_flags(body):
    client = chat(app(), **body)
    assert client.status == 400
    error = client.json()["error"]
    assert error["message"] == (
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    )
    assert error["type"] == "BadRequestError" and error["param"] == "tool_choice"
    assert not client.commands  # nothing reached the engine


def test_auto_tool_call_parsed_from_hermes_output():
    client = chat(hermes_app(), tools=[WEATHER])
    client.feed(*script(client.generate.request_id, HERMES_CALL))
    (choice,) = client.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("per_step", [1, 3, 200])
def test_auto_tool_call_streamed_in_any_chunking(per_step):
    client = chat(hermes_app(), tools=[WEATHER], stream=True)
    client.feed(*script(client.generate.request_id, "Let me check. " + HERMES_CALL, per_step=per_step))
    events = client.events()
    (call,), deltas = streamed_calls(events)
    assert call["name"] == "get_weather" and call["id"].startswith("chatcmpl-tool-")
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert deltas[0].get("type") == "function" and all("type" not in d for d in deltas[1:])
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert content == "Let me check. "
    assert finish_reason(events) == "tool_calls"


def test_auto_without_a_call_is_plain_content():
    client = chat(hermes_app(), tools=[WEATHER])
    client.feed(*script(client.generate.request_id, "It is sunny."))
    (choice,) = client.json()["choices"]
    assert choice["message"]["content"] == "It is sunny." and choice["message"]["tool_calls"] == []
    assert choice["finish_reason"] == "stop"


def test_parallel_tool_calls_false_keeps_only_the_first_call():
    text = HERMES_CALL + "\n" + HERMES_CALL.replace("Paris", "Rome")
    client = chat(hermes_app(), tools=[WEATHER], parallel_tool_calls=False)
    client.feed(*script(client.generate.request_id, text))
    (call,) = client.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    both = chat(hermes_app(), tools=[WEATHER])
    both.feed(*script(both.generate.request_id, text))
    calls = both.json()["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c["id"] for c in calls}) == 2


# ---- forced choices ----


def test_named_tool_choice_constrains_and_answers_a_call_with_finish_reason_stop():
    named = {"type": "function", "function": {"name": "get_weather"}}
    client = chat(app(), tools=[WEATHER, TIME], tool_choice=named)
    constraint = client.generate.params.structured
    assert json.loads(constraint.json) == WEATHER["function"]["parameters"]
    client.feed(*script(client.generate.request_id, '{"city": "Paris"}'))
    (choice,) = client.json()["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_named_tool_choice_streams_name_once_then_arguments():
    named = {"type": "function", "function": {"name": "get_weather"}}
    client = chat(app(), tools=[WEATHER], tool_choice=named, stream=True)
    client.feed(*script(client.generate.request_id, '{"city": "Paris"}', per_step=2))
    events = client.events()
    (call,), deltas = streamed_calls(events)
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert len(deltas) > 3 and deltas[0]["function"]["name"] == "get_weather"
    assert finish_reason(events) == "stop"


REQUIRED_OUTPUT = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'


def test_required_tool_choice_answers_every_call_with_finish_reason_tool_calls():
    client = chat(app(), tools=[WEATHER, TIME], tool_choice="required")
    assert client.generate.params.structured.json is not None
    client.feed(*script(client.generate.request_id, REQUIRED_OUTPUT))
    (choice,) = client.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {}]


@pytest.mark.parametrize("per_step", [1, 7, 500])
def test_required_tool_choice_streams_each_call(per_step):
    client = chat(app(), tools=[WEATHER, TIME], tool_choice="required", stream=True)
    client.feed(*script(client.generate.request_id, REQUIRED_OUTPUT, per_step=per_step))
    events = client.events()
    calls, _ = streamed_calls(events)
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {}]
    assert finish_reason(events) == "tool_calls"


# ---- reasoning ----


def test_reasoning_is_split_from_content():
    client = chat(app(reasoning_parser="deepseek_r1"))
    client.feed(*script(client.generate.request_id, "Paris is in France.</think>The capital is Paris."))
    message = client.json()["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "Paris is in France."
    assert message["content"] == "The capital is Paris."


def test_include_reasoning_false_drops_it():
    client = chat(app(reasoning_parser="deepseek_r1"), include_reasoning=False, stream=True)
    client.feed(*script(client.generate.request_id, "hmm</think>Yes."))
    events = client.events()
    assert all("reasoning" not in e["choices"][0]["delta"] for e in events if e["choices"])
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "Yes."


@pytest.mark.parametrize("per_step", [1, 1000])
def test_tool_call_right_after_the_reasoning_in_the_same_delta(per_step):
    app_ = app(reasoning_parser="deepseek_r1", enable_auto_tool_choice=True, tool_call_parser="hermes")
    client = chat(app_, tools=[WEATHER], stream=True)
    client.feed(*script(client.generate.request_id, "I need the weather.</think>" + HERMES_CALL, per_step=per_step))
    events = client.events()
    reasoning = "".join(e["choices"][0]["delta"].get("reasoning") or "" for e in events if e["choices"])
    assert reasoning == "I need the weather."
    (call,), _ = streamed_calls(events)
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert finish_reason(events) == "tool_calls"
