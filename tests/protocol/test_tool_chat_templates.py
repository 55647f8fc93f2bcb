"""The tool-calling chat templates in examples/ render an agent loop the way their tool-call parsers read it.

Each template is rendered through the public API (`normalize_messages` + `ChatTemplate.render`) on the
conversation an OpenAI client sends back after a tool call: the question, the assistant's call (its
arguments a JSON string, its content null), the tool's result, and a generation prompt. What the model
sees is checked as facts, not as whole strings: the tool's name and parameter schema are offered, the
call appears in the template's own call format with the arguments decoded, the result follows it, and
the prompt ends where the model answers. The same templates render plain chats without any tool text.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocol.chat_template import ChatTemplate, normalize_messages
from protocol.errors import ProtocolError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city, in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}
QUESTION = {"role": "user", "content": "What's the weather like in Paris today?"}
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"}
AGENT_LOOP = [{"role": "system", "content": "You are a weather bot."}, QUESTION, CALL, RESULT]
DECODED_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}

PARALLEL = [
    QUESTION,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "22 C and sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "9 C and rain"},
]

PLAIN = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Norway?"},
]


def render(template: str, messages: list[dict], **kwargs) -> str:
    compiled = ChatTemplate(template)
    kwargs.setdefault("add_generation_prompt", True)
    return compiled.render(normalize_messages(messages, compiled.content_format), **kwargs)


def bad_request(call: Callable, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    assert info.value.status == 400
    return info.value


def between(text: str, start: str, end: str) -> list[str]:
    return re.findall(re.escape(start) + "(.*?)" + re.escape(end), text, flags=re.DOTALL)


# --------------------------------------------------------------------------------------------------
# What each template's format looks like, as its tool-call parser reads it
# --------------------------------------------------------------------------------------------------


def pythonic_calls(text: str) -> list[dict]:
    """`[f(a=1), g(b="x")]` as {"name", "arguments"} dicts, read the way the pythonic parser reads it."""
    tree = ast.parse(text.strip(), mode="eval").body
    assert isinstance(tree, ast.List)
    calls = []
    for call in tree.elts:
        assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args
        calls.append(
            {"name": call.func.id, "arguments": {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}}
        )
    return calls


def assistant_turns(prompt: str) -> list[str]:
    return between(prompt, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")


@dataclass(frozen=True)
class Format:
    """How to read one template's prompt: the tools it offers, the calls it shows, the results it gives."""

    file: str
    listed_tools: Callable[[str], list[dict]]
    calls: Callable[[str], list[dict]]  # each as {"name": ..., "arguments": {...}}
    result: Callable[[str], str]  # how a tool result with this text appears
    generation_prompt: str  # the prompt ends with this when add_generation_prompt is set
    tool_instructions: tuple[str, ...]  # text that appears only when tools are given
    user_end: str  # what closes a user turn

    @property
    def source(self) -> str:
        return (EXAMPLES / self.file).read_text()


def _hermes_calls(prompt: str) -> list[dict]:
    """Calls in assistant turns only: the system turn shows the format with placeholders."""
    turns = between(prompt, "<|im_start|>assistant", "<|im_end|>")
    return [json.loads(call) for turn in turns for call in between(turn, "<tool_call>\n", "\n</tool_call>")]


def _mistral_calls(prompt: str) -> list[dict]:
    calls = [call for block in between(prompt, "[TOOL_CALLS] ", "</s>") for call in json.loads(block)]
    for call in calls:
        assert isinstance(call.pop("id"), str)  # Mistral pairs results with calls by id
    return calls


def _llama3_calls(prompt: str) -> list[dict]:
    calls = []
    for turn in assistant_turns(prompt):
        last = turn.rsplit("\n\n", 1)[-1]  # any text the assistant wrote comes before its calls
        if last.startswith("{"):
            for text in last.split("; "):
                call = json.loads(text)
                calls.append({"name": call["name"], "arguments": call["parameters"]})
    return calls


def _llama3_tools(prompt: str) -> list[dict]:
    first_user = between(prompt, "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")[0]
    decoder = json.JSONDecoder()
    return [
        decoder.raw_decode(first_user, m.start())[0]
        for m in re.finditer(r'^\{\n    "type"', first_user, re.M)
    ]


def _pythonic_tools(prompt: str) -> list[dict]:
    system = between(prompt, "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")[0]
    return json.loads(system[system.index("\n[\n") + 1 :])


def _pythonic_prompt_calls(prompt: str) -> list[dict]:
    lasts = [turn.rsplit("\n\n", 1)[-1] for turn in assistant_turns(prompt)]
    return [call for last in lasts if last.startswith("[") for call in pythonic_calls(last)]


FORMATS = {
    "hermes": Format(
        "tool_chat_template_hermes.jinja",
        lambda prompt: [
            json.loads(line) for line in between(prompt, "<tools>\n", "\n</tools>")[0].split("\n")
        ],
        _hermes_calls,
        lambda text: f"<tool_response>\n{text}\n</tool_response>",
        "<|im_start|>assistant\n",
        ("<tools>", "<tool_call>", "# Tools"),
        "<|im_end|>\n",
    ),
    "mistral": Format(
        "tool_chat_template_mistral.jinja",
        lambda prompt: json.loads(between(prompt, "[AVAILABLE_TOOLS] ", "[/AVAILABLE_TOOLS]")[0]),
        _mistral_calls,
        lambda text: "[TOOL_RESULTS] " + json.dumps({"content": text}, ensure_ascii=False)[:-1],
        "",  # Mistral has no generation prompt: the model answers after [/INST] or [/TOOL_RESULTS]
        ("[AVAILABLE_TOOLS]", "[TOOL_CALLS]"),
        " [/INST]",
    ),
    "llama3_json": Format(
        "tool_chat_template_llama3_json.jinja",
        _llama3_tools,
        _llama3_calls,
        lambda text: f"<|start_header_id|>ipython<|end_header_id|>\n\n{text}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ('"parameters": dictionary', "function name"),
        "<|eot_id|>",
    ),
    "pythonic": Format(
        "tool_chat_template_pythonic.jinja",
        _pythonic_tools,
        _pythonic_prompt_calls,
        lambda text: f"<|start_header_id|>ipython<|end_header_id|>\n\n{text}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("func_name1", "list of functions"),
        "<|eot_id|>",
    ),
}
NAMES = list(FORMATS)


@pytest.fixture(params=NAMES)
def fmt(request) -> Format:
    return FORMATS[request.param]


# --------------------------------------------------------------------------------------------------
# The agent loop
# --------------------------------------------------------------------------------------------------


def test_every_example_tool_template_is_tested():
    assert sorted(path.name for path in EXAMPLES.glob("tool_chat_template_*.jinja")) == sorted(
        f.file for f in FORMATS.values()
    )


def test_each_template_says_which_parser_it_pairs_with(fmt):
    header = fmt.source.split("-#}", 1)[0]
    name = fmt.file.removeprefix("tool_chat_template_").removesuffix(".jinja")
    assert f"--tool-call-parser {name}" in header


def test_agent_loop_shows_tools_call_result_and_generation_prompt(fmt):
    original = copy.deepcopy(AGENT_LOOP)
    prompt = render(fmt.source, AGENT_LOOP, tools=[WEATHER_TOOL])
    assert AGENT_LOOP == original  # the request is not modified

    assert fmt.listed_tools(prompt) == [WEATHER_TOOL]  # name, description and parameter schema, as given
    assert "°C" in prompt  # tojson keeps non-ASCII, like HF
    assert fmt.calls(prompt) == [DECODED_CALL]  # the JSON string was decoded for the template
    assert "You are a weather bot." in prompt
    asked = prompt.index(QUESTION["content"])
    offered = prompt.index("get_weather")
    called = prompt.index("Paris", asked + len(QUESTION["content"]))
    answered = prompt.index(fmt.result("22 C and sunny"))
    assert offered < called and asked < called < answered
    assert prompt.endswith(fmt.generation_prompt)
    assert prompt.count("22 C and sunny") == 1


def test_parallel_calls_and_their_results_keep_their_order(fmt):
    prompt = render(fmt.source, PARALLEL, tools=[WEATHER_TOOL])
    assert fmt.calls(prompt) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
    ]
    first, second = prompt.index(fmt.result("22 C and sunny")), prompt.index(fmt.result("9 C and rain"))
    assert prompt.index("Oslo") < first < second
    assert prompt.endswith(fmt.generation_prompt)


def test_a_plain_chat_renders_without_tool_instructions(fmt):
    prompt = render(fmt.source, PLAIN)
    for text in ("get_weather", *fmt.tool_instructions):
        assert text not in prompt
    assert PLAIN[0]["content"] in prompt  # Mistral folds it into the last user turn, the others lead with it
    positions = [prompt.index(message["content"]) for message in PLAIN[1:]]
    assert positions == sorted(positions)
    assert prompt.endswith(fmt.generation_prompt)
    assert render(fmt.source, PLAIN, tools=[]) == prompt == render(fmt.source, PLAIN, tools=None)


def test_a_question_with_tools_offered_ends_with_the_generation_prompt(fmt):
    prompt = render(fmt.source, [QUESTION], tools=[WEATHER_TOOL])
    assert fmt.listed_tools(prompt) == [WEATHER_TOOL]
    assert fmt.calls(prompt) == []
    assert prompt.endswith(fmt.generation_prompt)
    without = render(fmt.source, [QUESTION], add_generation_prompt=False)
    assert without.endswith(QUESTION["content"] + fmt.user_end)


@pytest.mark.parametrize(
    "tool_message",
    [
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "22 C and sunny"}]},
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": [{"type": "text", "text": "22 C"}, "and sunny"],
        },
    ],
    ids=["one-part", "two-parts"],
)
def test_tool_results_given_as_text_parts_are_rendered_as_text(fmt, tool_message):
    prompt = render(fmt.source, [QUESTION, CALL, tool_message], tools=[WEATHER_TOOL])
    text = "\n".join(part if isinstance(part, str) else part["text"] for part in tool_message["content"])
    assert fmt.result(text) in prompt
    assert fmt.calls(prompt) == [DECODED_CALL]


def test_assistant_text_beside_calls_is_kept(fmt):
    call = {**CALL, "content": "Let me check."}
    prompt = render(fmt.source, [QUESTION, call, RESULT], tools=[WEATHER_TOOL])
    assert prompt.index("Let me check.") < prompt.index(fmt.result("22 C and sunny"))
    assert fmt.calls(prompt) == [DECODED_CALL]


def test_templates_match_transformers(fmt, hf_tokenizer):
    for messages, tools in ((AGENT_LOOP, [WEATHER_TOOL]), (PARALLEL, [WEATHER_TOOL]), (PLAIN, None)):
        normalized = normalize_messages(messages, "string")
        expected = hf_tokenizer.apply_chat_template(
            copy.deepcopy(normalized),
            chat_template=fmt.source,
            tools=tools,
            tokenize=False,
            add_generation_prompt=True,
        )
        got = render(
            fmt.source,
            messages,
            tools=tools,
            bos_token=hf_tokenizer.bos_token,
            eos_token=hf_tokenizer.eos_token,
        )
        assert got == expected


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A tiny transformers tokenizer whose `apply_chat_template` is the reference (as in test_chat_template)."""
    pytest.importorskip(
        "transformers", reason="reference renderer, blocked by the no-IO guard run", exc_type=ImportError
    )
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


# --------------------------------------------------------------------------------------------------
# Template-specific rules
# --------------------------------------------------------------------------------------------------


def test_mistral_offers_tools_before_the_last_user_message_with_the_system_text():
    source = FORMATS["mistral"].source
    messages = [*PLAIN, {"role": "assistant", "content": "Oslo."}, QUESTION]
    prompt = render(source, messages, tools=[WEATHER_TOOL])
    assert prompt.startswith(
        "<s>[INST] Capital of France? [/INST]Paris.</s>[INST] And of Norway? [/INST]Oslo.</s>"
    )
    assert prompt.endswith(
        "[/AVAILABLE_TOOLS][INST] You answer in one word.\n\nWhat's the weather like in Paris today? [/INST]"
    )
    assert prompt.count("[AVAILABLE_TOOLS]") == 1 and prompt.count("<s>") == 1


def test_mistral_pairs_results_with_call_ids_only_when_given():
    source = FORMATS["mistral"].source
    prompt = render(source, AGENT_LOOP, tools=[WEATHER_TOOL])
    (result,) = between(prompt, "[TOOL_RESULTS] ", "[/TOOL_RESULTS]")
    assert json.loads(result) == {"content": "22 C and sunny", "call_id": "call_1"}
    (calls,) = between(prompt, "[TOOL_CALLS] ", "</s>")
    assert json.loads(calls) == [{**DECODED_CALL, "id": "call_1"}]

    anonymous_call = {
        **CALL,
        "tool_calls": [{"type": "function", "function": CALL["tool_calls"][0]["function"]}],
    }
    for tool_call_id in (None, "absent"):
        result_message = {"role": "tool", "content": "22 C and sunny"}
        if tool_call_id is None:
            result_message["tool_call_id"] = None
        prompt = render(source, [QUESTION, anonymous_call, result_message], tools=[WEATHER_TOOL])
        assert json.loads(between(prompt, "[TOOL_RESULTS] ", "[/TOOL_RESULTS]")[0]) == {
            "content": "22 C and sunny"
        }
        assert json.loads(between(prompt, "[TOOL_CALLS] ", "</s>")[0]) == [DECODED_CALL]


def test_mistral_uses_the_tokenizers_special_tokens_when_known():
    prompt = render(FORMATS["mistral"].source, PLAIN, bos_token="<BOS>", eos_token="<EOS>")
    assert prompt.startswith("<BOS>[INST]") and "Paris.<EOS>" in prompt


def test_llama3_json_puts_tools_in_the_first_user_message_and_needs_one():
    source = FORMATS["llama3_json"].source
    prompt = render(
        source, [*PLAIN, {"role": "assistant", "content": "Oslo."}, QUESTION], tools=[WEATHER_TOOL]
    )
    users = between(prompt, "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
    assert '{"name": function name, "parameters": dictionary of argument name and its value}' in users[0]
    assert users[0].endswith("\n\nCapital of France?")
    assert users[1:] == ["And of Norway?", QUESTION["content"]]
    assert prompt.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one word."
    )
    error = bad_request(render, source, [{"role": "system", "content": "hi"}], tools=[WEATHER_TOOL])
    assert "no user message" in error.message


PYTHON_VALUES = {
    "city": 'Pa"ris\n\\ é',
    "days": 3,
    "ratio": 0.5,
    "metric": True,
    "alerts": False,
    "region": None,
    "nested": {"list": [1, "two", None, {"deep": False}], "empty": {}},
}


def test_pythonic_arguments_are_python_literals():
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": json.dumps(PYTHON_VALUES)}}
        ],
    }
    prompt = render(FORMATS["pythonic"].source, [QUESTION, call], add_generation_prompt=False)
    (turn,) = assistant_turns(prompt)
    assert pythonic_calls(turn) == [{"name": "f", "arguments": PYTHON_VALUES}]
    assert "metric=True, alerts=False, region=None" in turn


def test_pythonic_call_without_arguments():
    call = {
        "role": "assistant",
        "tool_calls": [{"id": "x", "type": "function", "function": {"name": "now", "arguments": ""}}],
    }
    (turn,) = assistant_turns(
        render(FORMATS["pythonic"].source, [QUESTION, call], add_generation_prompt=False)
    )
    assert turn == "[now()]"


# --------------------------------------------------------------------------------------------------
# Message normalization of tool calls and tool results
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_format", ["string", "openai"])
def test_null_content_beside_tool_calls_is_empty_and_calls_are_decoded(content_format):
    assistant, tool = normalize_messages([CALL, RESULT], content_format)
    assert assistant["content"] == ("" if content_format == "string" else [])
    assert assistant["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ]
    assert tool["tool_call_id"] == "call_1"


def test_tool_results_given_as_parts_are_joined_or_kept_as_parts():
    message = {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "a"}, "b"]}
    assert normalize_messages([message], "string") == [
        {"role": "tool", "content": "a\nb", "tool_call_id": "call_1"}
    ]
    assert normalize_messages([message], "openai")[0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]


def test_a_null_tool_call_id_is_left_out():
    message = {"role": "tool", "tool_call_id": None, "content": "x"}
    assert normalize_messages([message], "string") == [{"role": "tool", "content": "x"}]


@pytest.mark.parametrize(
    ("arguments", "decoded"),
    [
        ("", {}),
        ("  \n", {}),
        (None, {}),
        ([], {}),
        ({}, {}),
        ("null", None),
        ('"x"', "x"),
        ("[1, 2]", [1, 2]),
    ],
    ids=repr,
)
def test_empty_arguments_are_an_empty_object_and_other_json_passes(arguments, decoded):
    message = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}
    assert normalize_messages([message], "string")[0]["tool_calls"][0]["function"]["arguments"] == decoded


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        ({"function": {"arguments": "{}"}}, "messages[0].tool_calls[0].function has no 'name'."),
        ({"function": {"name": None}}, "function has no 'name'."),
        ({"function": {"name": 7}}, "messages[0].tool_calls[0].function.name must be a string."),
        ({"id": 5, "function": {"name": "f"}}, "messages[0].tool_calls[0].id must be a string."),
        ({"function": {"name": "f", "arguments": 0}}, "function.arguments must be a JSON string."),
        ({"function": {"name": "f", "arguments": False}}, "function.arguments must be a JSON string."),
        ({"function": {"name": "f", "arguments": '{"city": '}}, "function.arguments is not valid JSON"),
    ],
)
def test_malformed_tool_calls_are_400s_that_name_the_field(call, fragment):
    for content_format in ("string", "openai"):
        error = bad_request(normalize_messages, [{"role": "assistant", "tool_calls": [call]}], content_format)
        assert fragment in error.message
        assert error.param == "messages"


# --------------------------------------------------------------------------------------------------
# The template shipped inside the Qwen2.5-Coder GGUF (`make fetch-models`)
# --------------------------------------------------------------------------------------------------

QWEN_GGUF = (
    Path(os.environ.get("SANSLLM_CACHE") or Path.home() / ".cache" / "sansllm")
    / "models"
    / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
)


@pytest.mark.skipif(
    not QWEN_GGUF.is_file(),
    reason=f"{QWEN_GGUF} is not there: run `make fetch-models` to test the Qwen2.5-Coder GGUF's own template",
)
def test_the_qwen_gguf_template_renders_the_agent_loop():
    gguf_file = pytest.importorskip(
        "engine.gguf_file", reason="the GGUF reader, blocked by the no-IO guard run", exc_type=ImportError
    )
    template = gguf_file.GGUFIndex.open(QWEN_GGUF).metadata["tokenizer.chat_template"]
    assert isinstance(template, str)
    prompt = render(template, AGENT_LOOP, tools=[WEATHER_TOOL])
    assert FORMATS["hermes"].listed_tools(prompt) == [WEATHER_TOOL]
    assert FORMATS["hermes"].calls(prompt) == [DECODED_CALL]
    assert prompt.index("</tool_call>") < prompt.index("<tool_response>\n22 C and sunny\n</tool_response>")
    assert prompt.startswith("<|im_start|>system\nYou are a weather bot.")
    assert prompt.endswith("<|im_start|>assistant\n")
    plain = render(template, PLAIN)
    assert "<tools>" not in plain and plain.endswith("<|im_end|>\n<|im_start|>assistant\n")
