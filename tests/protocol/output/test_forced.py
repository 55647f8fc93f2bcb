"""The forced tool-call readers (named and "required" tool_choice) in every chunking.

Their input is JSON that structured output made the model write, in whatever spacing the guide
allowed; the calls they read must not depend on how the text was cut into deltas.
"""

from __future__ import annotations

import json

import pytest

from protocol.output.deltas import join
from protocol.output.forced import NamedToolCall, RequiredToolCalls
from tests.protocol.output.streaming import chunkings, run

REQUIRED = [
    ('[{"name": "f", "parameters": {"a": 1}}]', [("f", {"a": 1})]),
    ('[{ "name": "f" , "parameters": { "a": "}{" } } ]', [("f", {"a": "}{"})]),
    (
        '[{ "name": "a","parameters":{"x" : 1}}, { "name": "b","parameters":{"y" : [2]} },{ "name": "a","parameters":{}}]',
        [("a", {"x": 1}), ("b", {"y": [2]}), ("a", {})],
    ),
    ('[{"name": "say \\"hi\\"", "parameters": {"text": "\\\\"}}]', [('say "hi"', {"text": "\\"})]),
]


@pytest.mark.parametrize(("text", "calls"), REQUIRED)
def test_required_calls_read_the_same_in_every_chunking(text, calls):
    for chunks in chunkings(text):
        content, reasoning, read = join(run(RequiredToolCalls(), chunks))
        assert (content, reasoning) == ("", "")
        assert [(call.name, json.loads(call.arguments)) for call in read] == calls, chunks
        assert [call.id for call in read] == [f"chatcmpl-tool-{i}" for i in range(len(calls))]


def test_named_call_is_the_whole_output_as_arguments():
    text = '{ "city": "Paris" }'
    for chunks in chunkings(text):
        (call,) = join(run(NamedToolCall("get_weather"), chunks))[2]
        assert (call.name, call.arguments) == ("get_weather", text)
    (empty,) = join(run(NamedToolCall("noop"), []))[2]
    assert (empty.name, empty.arguments) == ("noop", "")
