"""Chat templates render exactly what HF transformers renders, and a bad request is always a 400."""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.chat_template import (
    CHATML_TEMPLATE,
    ChatTemplate,
    looks_like_file_path,
    normalize_messages,
)
from protocol.errors import ProtocolError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# SmolLM2-135M-Instruct's template, read once from the GGUF's `tokenizer.chat_template`.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A list-of-parts template (the shape multimodal HF templates have), for the "openai" format.
PARTS_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

HERMES_TEMPLATE = (EXAMPLES / "tool_chat_template_hermes.jinja").read_text()

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city, in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A real transformers tokenizer (tiny vocabulary) whose `apply_chat_template` is the reference.

    The layering check re-runs tests/protocol with transformers import-blocked (tests/no_io_guard.py);
    there only these reference comparisons step aside, everything else still runs.
    """
    pytest.importorskip(
        "transformers", reason="reference renderer, blocked by the no-IO guard run", exc_type=ImportError
    )
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="[UNK]"
    )
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    return tokenizer


def hf_render(tokenizer, messages, template=SMOLLM2_TEMPLATE, **kwargs):
    return tokenizer.apply_chat_template(
        copy.deepcopy(messages), chat_template=template, tokenize=False, **kwargs
    )


def our_render(messages, template=SMOLLM2_TEMPLATE, *, tokenizer=None, **kwargs):
    compiled = ChatTemplate(template)
    if tokenizer is not None:
        kwargs.setdefault("bos_token", tokenizer.bos_token)
        kwargs.setdefault("eos_token", tokenizer.eos_token)
    return compiled.render(normalize_messages(messages, compiled.content_format), **kwargs)


def bad_request(call, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    error = info.value
    assert error.status == 400
    assert json.loads(error.to_json())["error"]["code"] == 400
    return error


# --------------------------------------------------------------------------------------------------
# Rendering matches transformers
# --------------------------------------------------------------------------------------------------

USER_ONLY = [{"role": "user", "content": "What is the capital of France?"}]
WITH_SYSTEM = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
]
MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Tell me a joke about {{ jinja }} and {% tags %}."},
]
PREFILL = [
    {"role": "user", "content": "Write a haiku."},
    {"role": "assistant", "content": "Autumn moonlight, "},
]


@pytest.mark.parametrize("messages", [USER_ONLY, WITH_SYSTEM, MULTI_TURN], ids=["user", "system", "multi"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(hf_tokenizer, messages, add_generation_prompt):
    expected = hf_render(hf_tokenizer, messages, add_generation_prompt=add_generation_prompt)
    got = our_render(messages, tokenizer=hf_tokenizer, add_generation_prompt=add_generation_prompt)
    assert got == expected


def test_smollm2_prompt_is_chatml_with_default_system_prompt():
    prompt = our_render(USER_ONLY)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "final", ["Autumn moonlight, ", "Autumn moonlight", "", "line one\nline two\n"], ids=repr
)
def test_continue_final_message_matches_transformers(hf_tokenizer, final):
    messages = [PREFILL[0], {"role": "assistant", "content": final}]
    expected = hf_render(hf_tokenizer, messages, add_generation_prompt=False, continue_final_message=True)
    got = our_render(messages, add_generation_prompt=False, continue_final_message=True)
    assert got == expected
    assert got.endswith("<|im_start|>assistant\n" + final)  # left open: no <|im_end|>


def test_continue_final_message_with_content_parts_matches_transformers(hf_tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Count to three."}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "One, "}, {"type": "text", "text": "two, "}],
        },
    ]
    assert ChatTemplate(PARTS_TEMPLATE).content_format == "openai"
    normalized = normalize_messages(messages, "openai")
    expected = hf_render(
        hf_tokenizer, normalized, PARTS_TEMPLATE, add_generation_prompt=False, continue_final_message=True
    )
    got = our_render(messages, PARTS_TEMPLATE, add_generation_prompt=False, continue_final_message=True)
    assert got == expected == "<|user|>Count to three.</s>\n<|assistant|>One, two, "


def test_continue_final_message_survives_a_template_that_strips_the_marker():
    # transformers' marker is removed by this template; the last occurrence of the text is used instead.
    template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content | replace('CONTINUE_FINAL_MESSAGE_TAG', '') }}"
        "[/{{ m.role }}]{% endfor %}"
    )
    prompt = ChatTemplate(template).render(PREFILL, add_generation_prompt=False, continue_final_message=True)
    assert prompt == "[user]Write a haiku.[/user][assistant]Autumn moonlight, "


def test_continue_final_message_leaves_the_callers_messages_alone():
    messages = normalize_messages(PREFILL, "string")
    before = copy.deepcopy(messages)
    ChatTemplate(SMOLLM2_TEMPLATE).render(messages, add_generation_prompt=False, continue_final_message=True)
    assert messages == before


def test_tools_are_passed_to_the_template_like_transformers(hf_tokenizer):
    # SmolLM2's template ignores tools: the prompt is the same as without them, as in HF.
    expected = hf_render(hf_tokenizer, WITH_SYSTEM, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert our_render(WITH_SYSTEM, tools=[WEATHER_TOOL]) == expected == our_render(WITH_SYSTEM)


TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
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
    {"role": "tool", "tool_call_id": "c1", "content": "18"},
    {"role": "tool", "tool_call_id": "c2", "content": "9"},
]


@pytest.mark.parametrize("messages", [TOOL_CONVERSATION, TOOL_CONVERSATION[1:2]], ids=["calls", "question"])
@pytest.mark.parametrize("tools", [[WEATHER_TOOL], None], ids=["tools", "no-tools"])
def test_hermes_tool_template_matches_transformers(hf_tokenizer, messages, tools):
    normalized = normalize_messages(messages, "string")
    expected = hf_render(hf_tokenizer, normalized, HERMES_TEMPLATE, tools=tools, add_generation_prompt=True)
    assert our_render(messages, HERMES_TEMPLATE, tools=tools) == expected


def test_hermes_tool_template_shows_tools_and_calls_as_json():
    prompt = our_render(TOOL_CONVERSATION, HERMES_TEMPLATE, tools=[WEATHER_TOOL])
    listed = re.search(r"<tools>\n(.*)\n</tools>", prompt).group(1)
    assert json.loads(listed) == WEATHER_TOOL
    assert "°C" in listed  # tojson keeps non-ASCII, like HF
    answer = prompt.split("<|im_start|>assistant\n", 1)[1]
    calls = re.findall(r"<tool_call>\n(\{.*\})\n</tool_call>", answer)
    assert [json.loads(call) for call in calls] == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
    ]
    assert (
        "<|im_start|>user\n<tool_response>\n18\n</tool_response>\n<tool_response>\n9\n</tool_response>"
        in prompt
    )
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


# Exercises every helper transformers gives templates.
HELPERS_TEMPLATE = """\
{%- set ns = namespace(count=0) -%}
{{ bos_token }}
{%- for message in messages -%}
    {%- if message.role == 'skip' %}{% continue %}{% endif -%}
    {%- set ns.count = ns.count + 1 -%}
    [{{ message.role }}]{{ message.content }}
    {%- if message.reasoning_content %}<think>{{ message.reasoning_content }}|{{ message.thinking }}</think>{% endif %}
    {%- if message.role == 'stop' %}{% break %}{% endif %}
{% endfor -%}
{{ ns.count }} {{ dict(a=1) | tojson }} {{ tools | tojson(indent=2) }}
{% if documents %}{% for d in documents %}<doc title="{{ d.title }}">{{ d.text }}</doc>{% endfor %}{% endif %}
{% generation %}{{ enable_thinking | default('unset') }}{% endgeneration %}{{ eos_token }}
{%- if add_generation_prompt %}>>>{% endif %}"""


def test_template_helpers_match_transformers(hf_tokenizer):
    messages = [
        {"role": "user", "content": "héllo <b>"},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "ok", "reasoning": "because"},
        {"role": "stop", "content": "last"},
        {"role": "user", "content": "never shown"},
    ]
    documents = [{"title": "Doc", "text": "Text"}]
    kwargs = dict(
        tools=[WEATHER_TOOL], documents=documents, enable_thinking=False, add_generation_prompt=True
    )
    expected = hf_render(hf_tokenizer, normalize_messages(messages, "string"), HELPERS_TEMPLATE, **kwargs)
    got = our_render(messages, HELPERS_TEMPLATE, tokenizer=hf_tokenizer, **kwargs)
    assert got == expected
    assert "<think>because|because</think>" in got and "never shown" not in got and "hidden" not in got


def test_special_tokens_are_undefined_unless_given_and_kwargs_override_them():
    template = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}")
    assert template.render(USER_ONLY).startswith("||")
    assert template.render(USER_ONLY, bos_token="<s>", eos_token="</s>").startswith("<s>|</s>|")
    assert template.render(USER_ONLY, bos_token="<s>", **{"eos_token": "<end>"}).startswith("<s>|<end>|")


def test_strftime_now_reads_the_injected_clock():
    clock = lambda: datetime(2024, 7, 26, 9, 30)  # noqa: E731
    template = ChatTemplate("Today Date: {{ strftime_now('%d %b %Y') }}", clock=clock)
    assert template.render(USER_ONLY) == "Today Date: 26 Jul 2024"


def test_chatml_default_matches_its_example_file_and_transformers(hf_tokenizer):
    from_file = ChatTemplate((EXAMPLES / "template_chatml.jinja").read_text())
    for add in (True, False):
        expected = hf_render(hf_tokenizer, MULTI_TURN, CHATML_TEMPLATE, add_generation_prompt=add)
        assert our_render(MULTI_TURN, CHATML_TEMPLATE, add_generation_prompt=add) == expected
        assert from_file.render(MULTI_TURN, add_generation_prompt=add) == expected
    assert our_render(USER_ONLY, CHATML_TEMPLATE) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@st.composite
def conversations(draw):
    system = draw(st.lists(texts, max_size=1))
    turns = draw(st.lists(st.tuples(texts, texts), min_size=1, max_size=3))
    messages = [{"role": "system", "content": s} for s in system]
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if draw(st.booleans()):
        messages.pop()  # end on the user: ask for a reply
    return messages


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations(), mode=st.sampled_from(["generate", "plain", "continue"]))
def test_any_conversation_renders_like_transformers(hf_tokenizer, messages, mode):
    options = {"add_generation_prompt": mode == "generate", "continue_final_message": mode == "continue"}
    if mode == "continue" and messages[-1]["role"] != "assistant":
        options["continue_final_message"] = False
    assert our_render(messages, **options) == hf_render(hf_tokenizer, messages, **options)


# --------------------------------------------------------------------------------------------------
# Content format detection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (SMOLLM2_TEMPLATE, "string"),
        (CHATML_TEMPLATE, "string"),
        (HERMES_TEMPLATE, "string"),
        (PARTS_TEMPLATE, "openai"),
        ("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}", "openai"),
        # through a re-assignment of `messages` and a slice
        (
            "{% set loop_messages = messages[1:] %}{% for m in loop_messages %}"
            "{% for p in m['content'] | selectattr('type', 'equalto', 'text') %}{{ p.text }}{% endfor %}"
            "{% endfor %}",
            "openai",
        ),
        # a chain of re-assignments
        (
            "{% set a = messages %}{% set b = a %}{% for m in b %}{% for p in m.content %}{% endfor %}{% endfor %}",
            "openai",
        ),
        # `content` looped over, but not a message's
        ("{% for p in content %}{{ p }}{% endfor %}{{ messages }}", "string"),
        # a message's content checked but never iterated
        (
            "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% endif %}{% endfor %}",
            "string",
        ),
    ],
    ids=[
        "smollm2",
        "chatml",
        "hermes",
        "parts",
        "simple-loop",
        "reassigned",
        "chained",
        "other-var",
        "no-loop",
    ],
)
def test_content_format_is_detected_from_the_template(source, expected):
    assert ChatTemplate(source).content_format == expected


def test_content_format_falls_back_to_string_for_unfollowable_assignments():
    # a tuple target cannot be followed (vLLM gives up the same way)
    source = "{% set a, b = messages %}{% for p in a.content %}{% endfor %}"
    assert ChatTemplate(source).content_format == "string"


# --------------------------------------------------------------------------------------------------
# Every failure is a 400
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source", ["{% for m in messages %}", "{{ 1 +* }}", "{% endif %}", "{{ x | nosuchfilter }}"]
)
def test_bad_syntax_is_a_400_naming_the_template(source):
    error = bad_request(ChatTemplate, source)
    assert error.message.startswith("Invalid chat template:")
    assert error.param == "chat_template"


def test_a_template_that_is_not_a_string_is_a_400():
    bad_request(ChatTemplate, 42)


def test_raise_exception_message_reaches_the_client_verbatim():
    template = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'user' and loop.index0 % 2 %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    error = bad_request(template.render, messages)
    assert error.message == "Conversation roles must alternate user/assistant/user/assistant/..."


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{{ messages[0].content + none }}", "TypeError"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ undefined_thing.attribute }}", "undefined"),
        ("{{ messages.append(1) }}", "unsafe"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{% set ns = namespace() %}{% set ns._secret = 1 %}", "underscore"),
        ("{% set ns = namespace(_secret=1) %}", "underscore"),
        ("{{ messages | tojson(indent=none, separators=1) }}", "Error rendering"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    ],
    ids=["type", "zero", "undefined", "mutation", "escape", "ns-set", "ns-init", "tojson", "recursion"],
)
def test_render_time_failures_are_400s(source, fragment):
    error = bad_request(ChatTemplate(source).render, USER_ONLY)
    assert fragment in error.message
    assert error.message.startswith("Error rendering the chat template")


@pytest.mark.parametrize("key", ["chat_template", "tokenize", "messages"])
def test_reserved_chat_template_kwargs_are_refused(key):
    error = bad_request(ChatTemplate(CHATML_TEMPLATE).render, USER_ONLY, **{key: "x"})
    assert key in error.message


def test_messages_may_be_passed_by_keyword():
    template = ChatTemplate(CHATML_TEMPLATE)
    assert template.render(messages=USER_ONLY) == template.render(USER_ONLY)
    bad_request(template.render, messages=None)


def test_request_kwargs_override_the_request_fields_like_vllm():
    # vLLM merges chat_template_kwargs over add_generation_prompt/tools/documents; a caller doing the
    # same with ** gets the same result, and a stray "messages" key is a 400 rather than a TypeError.
    template = ChatTemplate(CHATML_TEMPLATE)
    request_fields = {"add_generation_prompt": True, "tools": None, "documents": None}
    chat_template_kwargs = {"add_generation_prompt": False}
    prompt = template.render(USER_ONLY, **{**request_fields, **chat_template_kwargs})
    assert not prompt.endswith("<|im_start|>assistant\n")
    bad_request(template.render, USER_ONLY, **{**request_fields, "messages": []})


def test_continue_and_generation_prompt_together_are_refused():
    error = bad_request(
        ChatTemplate(CHATML_TEMPLATE).render, PREFILL, add_generation_prompt=True, continue_final_message=True
    )
    assert "continue_final_message" in error.message


@pytest.mark.parametrize(
    ("messages", "options"),
    [
        ([], {}),
        ("hello", {}),
        ([["role", "user"]], {}),
        (USER_ONLY, {"tools": {"type": "function"}}),
        (USER_ONLY, {"tools": ["get_weather"]}),
        (USER_ONLY, {"documents": "doc"}),
    ],
    ids=["empty", "string", "not-objects", "tools-object", "tools-strings", "documents"],
)
def test_malformed_render_inputs_are_400s(messages, options):
    bad_request(ChatTemplate(CHATML_TEMPLATE).render, messages, **options)


def test_continue_without_text_to_continue_is_a_400():
    template = ChatTemplate(PARTS_TEMPLATE)
    messages = [{"role": "user", "content": []}, {"role": "assistant", "content": []}]
    error = bad_request(template.render, messages, add_generation_prompt=False, continue_final_message=True)
    assert "no text content to continue" in error.message
    no_content = [{"role": "assistant"}]
    bad_request(template.render, no_content, add_generation_prompt=False, continue_final_message=True)


def test_continue_when_the_template_drops_the_final_message_is_a_400():
    template = ChatTemplate("{% for m in messages[:-1] %}{{ m.content }}{% endfor %}")
    error = bad_request(template.render, PREFILL, add_generation_prompt=False, continue_final_message=True)
    assert "does not appear" in error.message


# --------------------------------------------------------------------------------------------------
# Message normalization
# --------------------------------------------------------------------------------------------------


def test_string_content_stays_a_string_or_becomes_one_text_part():
    messages = [{"role": "user", "content": "hi"}]
    assert normalize_messages(messages, "string") == [{"role": "user", "content": "hi"}]
    assert normalize_messages(messages, "openai") == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    ]


def test_text_parts_are_joined_with_newlines_or_kept_as_parts():
    content = [
        {"type": "text", "text": "one"},
        {"type": "input_text", "text": "two"},
        {"type": "output_text", "text": "three"},
        {"type": "refusal", "refusal": "four"},
        {"type": "text", "text": None},  # skipped, as vLLM does
        "five",
    ]
    messages = [{"role": "user", "content": content}]
    assert normalize_messages(messages, "string")[0]["content"] == "one\ntwo\nthree\nfour\nfive"
    assert normalize_messages(messages, "openai")[0]["content"] == [
        {"type": "text", "text": text} for text in ("one", "two", "three", "four", "five")
    ]


@pytest.mark.parametrize("message", [{"role": "assistant", "content": None}, {"role": "assistant"}])
def test_missing_content_becomes_empty(message):
    assert normalize_messages([message], "string")[0]["content"] == ""
    assert normalize_messages([message], "openai")[0]["content"] == []


def test_tool_call_arguments_are_decoded_for_templates():
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": [1, "é"]}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}},
        {"id": "c", "type": "function", "function": {"name": "h", "arguments": None}},
        {"id": "d", "type": "function", "function": {"name": "i", "arguments": {"already": "decoded"}}},
        {"id": "e", "type": "function", "function": {"name": "j"}},
    ]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    original = copy.deepcopy(message)
    (normalized,) = normalize_messages([message], "string")
    assert [call["function"]["arguments"] for call in normalized["tool_calls"]] == [
        {"x": [1, "é"]},
        {},
        {},
        {"already": "decoded"},
        {},
    ]
    assert [call["id"] for call in normalized["tool_calls"]] == ["a", "b", "c", "d", "e"]
    assert message == original  # the request is not modified


def test_tool_ids_names_and_reasoning_are_kept_and_unknown_fields_dropped():
    messages = [
        {"role": "user", "content": "q", "name": "alice", "extra": 1},
        {"role": "assistant", "content": "a", "reasoning": "thought"},
        {"role": "assistant", "content": "b", "reasoning_content": "older name"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "calc"},
    ]
    assert normalize_messages(messages, "string") == [
        {"role": "user", "content": "q", "name": "alice"},
        {"role": "assistant", "content": "a", "reasoning": "thought", "reasoning_content": "thought"},
        {"role": "assistant", "content": "b", "reasoning": "older name", "reasoning_content": "older name"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "calc"},
    ]


def test_custom_roles_are_allowed():
    assert normalize_messages([{"role": "ipython", "content": "x"}], "string") == [
        {"role": "ipython", "content": "x"}
    ]


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
        {"type": "input_image", "image_url": "https://example.com/cat.png"},
        {"image_url": "https://example.com/cat.png"},  # vLLM's shortcut without `type`
        {"audio_url": "https://example.com/a.wav"},
        {"video_url": "https://example.com/v.mp4"},
    ],
    ids=lambda part: part.get("type", "untyped-" + next(iter(part))),
)
def test_media_parts_are_refused_by_text_only_models(part):
    error = bad_request(normalize_messages, [{"role": "user", "content": [part]}], "string")
    assert "does not support multimodal inputs" in error.message


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "user", "content": [{"text": "no type"}]}], "Missing 'type' field in multimodal part."),
        ([{"role": "user", "content": [{"input_audio": None}]}], "Missing 'type' field in multimodal part."),
        ([{"role": "user", "content": [{"type": "hologram"}]}], "Unknown part type"),
        ([{"role": "user", "content": [{"type": 7}]}], "Invalid 'type' field"),
        ([{"role": "user", "content": 42}], "content must be"),
        ([{"role": "user", "content": {"type": "text"}}], "content must be"),
        ([{"role": "user", "content": [42]}], "content[0] must be an object"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
        ([{"content": "who am I"}], "has no 'role'"),
        ([{"role": 1, "content": "x"}], "role must be a string"),
        (["just a string"], "must be an object"),
        ("not a list", "must be a list"),
        ([{"role": "assistant", "tool_calls": "call"}], "tool_calls must be a list"),
        ([{"role": "assistant", "tool_calls": [{"id": "x"}]}], "'function' object"),
        ([{"role": "assistant", "tool_calls": ["x"]}], "'function' object"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
            "not valid JSON",
        ),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}], "JSON string"),
        ([{"role": "assistant", "content": "x", "reasoning": ["a"]}], "reasoning must be a string"),
        ([{"role": "tool", "content": "x", "tool_call_id": 5}], "tool_call_id must be a string"),
    ],
)
def test_malformed_messages_are_400s(messages, fragment):
    for content_format in ("string", "openai"):
        error = bad_request(normalize_messages, messages, content_format)
        assert fragment in error.message
        assert error.param == "messages"


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "message",
    [
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}],
        },
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": nested(5_000)}}]},
    ],
    ids=["json-string", "decoded"],
)
def test_absurdly_nested_messages_are_400s(message):
    error = bad_request(normalize_messages, [message], "string")
    assert "nested too deeply" in error.message


def test_absurdly_nested_render_inputs_are_400s():
    template = ChatTemplate(CHATML_TEMPLATE)
    error = bad_request(template.render, USER_ONLY, tools=[{"deep": nested(5_000)}])
    assert "nested too deeply" in error.message
    bad_request(template.render, USER_ONLY, enable_thinking=nested(5_000))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool", "system"]) | json_values},
    optional={
        "content": json_values
        | texts
        | st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "refusal", "image_url", "bogus"]) | json_values},
                optional={"text": json_values | texts, "refusal": texts, "image_url": json_values},
            )
            | json_values,
            max_size=3,
        ),
        "tool_calls": json_values
        | st.lists(
            st.fixed_dictionaries(
                {
                    "function": st.fixed_dictionaries(
                        {"name": texts}, optional={"arguments": json_values | texts}
                    )
                }
            ),
            max_size=2,
        ),
        "reasoning": json_values,
        "tool_call_id": json_values,
        "name": json_values,
    },
)


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(message_like, max_size=4) | json_values,
    content_format=st.sampled_from(["string", "openai"]),
)
def test_any_json_is_normalized_and_rendered_or_refused_with_a_400(messages, content_format):
    template = ChatTemplate(SMOLLM2_TEMPLATE if content_format == "string" else PARTS_TEMPLATE)
    try:
        normalized = normalize_messages(messages, content_format)
        prompt = template.render(normalized)
    except ProtocolError as error:
        assert error.status == 400
        assert isinstance(error.message, str)
        return
    assert prompt.endswith("<|im_start|>assistant\n" if content_format == "string" else "<|assistant|>")


# --------------------------------------------------------------------------------------------------
# --chat-template: path or inline template
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "is_path"),
    [
        ("examples/template_chatml.jinja", True),
        ("/abs/path/with spaces.jinja", True),
        ("template_chatml.jinja", True),
        ("{{ messages }}", False),
        ("{% for m in messages %}", False),
        ("line one\nline two", False),
        ("half}", False),
    ],
)
def test_looks_like_file_path(value, is_path):
    assert looks_like_file_path(value) is is_path
