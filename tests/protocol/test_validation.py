"""The request rules (status and message a client sees) and the mapping to the engine's SamplingParams."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.engine_api import SamplingParams, StructuredOutput
from protocol.errors import ProtocolError
from protocol.requests import ChatCompletionRequest, CompletionRequest, TokenizeChatRequest, decode_request
from protocol.testing import ByteTokenizer, tiny_served_model
from protocol.validation import (
    bad_words_token_ids,
    chat_sampling_params,
    check_context_length,
    check_prompt_token_ids,
    check_tokenize_chat_request,
    completion_sampling_params,
    resolve_model,
    stop_strings,
    tool_choice_schema,
    truncation_length,
)

USER = [{"role": "user", "content": "hi"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"$ref": "#/$defs/City"}},
                "$defs": {"City": {"type": "string"}},
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]
MAX_LOGPROBS = 20
PROMPT_LEN = 10


def model(max_model_len: int = 256, **generation_defaults):
    served = tiny_served_model(max_model_len=max_model_len)
    served.generation_defaults.update(generation_defaults)
    return served


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", USER)
    return decode_request(json.dumps(fields).encode(), ChatCompletionRequest)


def completion(**fields) -> CompletionRequest:
    fields.setdefault("prompt", "hi")
    return decode_request(json.dumps(fields).encode(), CompletionRequest)


def chat_params(served=None, prompt_len=PROMPT_LEN, max_logprobs=MAX_LOGPROBS, **fields) -> SamplingParams:
    return chat_sampling_params(chat(**fields), served or model(), prompt_len, max_logprobs)


def completion_params(
    served=None, prompt_len=PROMPT_LEN, max_logprobs=MAX_LOGPROBS, **fields
) -> SamplingParams:
    return completion_sampling_params(completion(**fields), served or model(), prompt_len, max_logprobs)


def chat_error(**fields) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        chat_params(**fields)
    assert info.value.status == 400 and info.value.type == "BadRequestError"
    return info.value


def completion_error(**fields) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        completion_params(**fields)
    assert info.value.status == 400
    return info.value


# ---- model resolution ----


def test_no_model_or_an_empty_name_means_the_first_served_model():
    first, second = model(), tiny_served_model(name="other")
    assert resolve_model(None, [first, second]) is first
    assert resolve_model("", [first, second]) is first
    assert resolve_model("other", [first, second]) is second


def test_any_served_name_is_accepted():
    served = model()
    served.names.append("alias")
    assert resolve_model("alias", [served]) is served


def test_unknown_model_is_a_404():
    with pytest.raises(ProtocolError) as info:
        resolve_model("gpt-4", [model()])
    assert info.value.status == 404 and info.value.type == "NotFoundError"
    assert info.value.message == "The model `gpt-4` does not exist."
    assert json.loads(info.value.to_json())["error"]["code"] == 404


# ---- the mapping ----


def test_chat_defaults():
    params = chat_params()
    assert params == SamplingParams(max_tokens=256 - PROMPT_LEN)


def test_generation_config_fills_what_the_request_leaves_unset():
    served = model(temperature=0.6, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1)
    params = chat_params(served)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.6, 0.9, 40, 0.05)
    assert params.repetition_penalty == 1.1
    params = chat_params(served, temperature=0.2, top_k=5)
    assert (params.temperature, params.top_k, params.top_p) == (0.2, 5, 0.9)


def test_chat_max_tokens_is_what_is_left_of_the_context_and_capped_by_the_model_default():
    assert chat_params(prompt_len=200).max_tokens == 56
    assert chat_params(model(max_tokens=32)).max_tokens == 32
    assert chat_params(max_tokens=7).max_tokens == 7
    assert chat_params(max_tokens=100, max_completion_tokens=9).max_tokens == 9


def test_completion_max_tokens_defaults_to_16():
    assert completion_params().max_tokens == 16
    assert completion_params(max_tokens=None).max_tokens == 256 - PROMPT_LEN


def test_request_values_reach_the_engine():
    params = chat_params(
        n=2,
        temperature=0.7,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        presence_penalty=1.5,
        frequency_penalty=-1.0,
        repetition_penalty=1.2,
        seed=42,
        min_tokens=3,
        ignore_eos=True,
        stop_token_ids=[5, 6],
        length_penalty=0.8,
    )
    assert params.n == 2 and params.temperature == 0.7 and params.top_p == 0.5
    assert params.top_k == 0  # -1 and 0 both disable
    assert (params.min_p, params.presence_penalty, params.frequency_penalty) == (0.1, 1.5, -1.0)
    assert (params.repetition_penalty, params.seed, params.min_tokens) == (1.2, 42, 3)
    assert params.ignore_eos and params.stop_token_ids == (5, 6) and params.length_penalty == 0.8


def test_null_fields_mean_their_defaults():
    params = chat_params(n=None, presence_penalty=None, frequency_penalty=None, top_logprobs=None, stop=None)
    assert params.n == 1 and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0


# ---- greedy, beam search, n ----


def test_greedy_sampling_requires_n_1():
    assert "n must be 1 when using greedy sampling" in chat_error(temperature=0, n=2).message
    assert chat_params(temperature=0, n=1).temperature == 0.0
    assert chat_params(temperature=0, n=2, use_beam_search=True).use_beam_search


def test_n_must_be_at_least_1():
    error = chat_error(n=0)
    assert error.message == "n must be at least 1, got 0." and error.param == "n"


def test_best_of_must_cover_n():
    assert "best_of must be greater than or equal to n" in completion_error(n=3, best_of=2).message
    assert completion_params(n=2, best_of=3).best_of == 3


# ---- ranges ----


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5."),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3.0."),
        ({"repetition_penalty": 0}, "repetition_penalty must be greater than zero, got 0.0."),
        ({"temperature": -0.1}, "temperature must be non-negative, got -0.1."),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0.0."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2."),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
        ({"max_tokens": 5, "min_tokens": 6}, "min_tokens must be less than or equal to max_tokens=5, got 6."),
        ({"stop": ["a", ""]}, "stop cannot contain an empty string."),
    ],
)
def test_out_of_range_values_are_refused_with_vllms_message(fields, message):
    assert chat_error(**fields).message == message
    assert completion_error(**fields).message == message


def test_the_param_names_the_field():
    assert chat_error(top_p=2).param == "top_p"
    assert chat_error(temperature=-1).param == "temperature"


# ---- logit_bias, allowed tokens, bad words ----


def test_logit_bias_keys_become_token_ids_and_biases_are_clamped():
    params = chat_params(logit_bias={"5": 200, "7": -1.5, "9": -300})
    assert params.logit_bias == {5: 100.0, 7: -1.5, 9: -100.0}


def test_logit_bias_out_of_vocab_is_refused():
    error = chat_error(logit_bias={"300": 1, "-1": 1})
    assert error.message == (
        "token_id(s) [300, -1] in logit_bias contain out-of-vocab token ids. Vocabulary size: 260"
    )
    assert error.param == "logit_bias"


def test_logit_bias_keys_must_be_integers():
    assert "logit_bias" in chat_error(logit_bias={"abc": 1}).message


def test_allowed_token_ids():
    assert chat_params(allowed_token_ids=[1, 2]).allowed_token_ids == (1, 2)
    assert chat_error(allowed_token_ids=[]).message == "allowed_token_ids is not None and empty!"
    assert (
        chat_error(allowed_token_ids=[1, 999]).message == "allowed_token_ids contains out-of-vocab token id!"
    )


def test_bad_words_are_tokenized_without_special_tokens():
    assert chat_params(bad_words=["bad", " worse"]).bad_words_token_ids == (tuple(b"bad"), tuple(b"worse"))


class _WordTokenizer(ByteTokenizer):
    """A tokenizer where " bad" is one token of its own, like a BPE vocabulary's "Ġbad"."""

    def encode(self, text, add_special_tokens=True):
        return {"bad": [1], " bad": [2]}.get(text) or super().encode(text, add_special_tokens)


def test_bad_words_also_block_the_spaced_form_when_it_is_a_different_token():
    assert bad_words_token_ids(["bad"], _WordTokenizer()) == ((1,), (2,))
    assert bad_words_token_ids([], ByteTokenizer()) is None


# ---- logprobs ----


def test_chat_logprobs_come_from_top_logprobs_only_when_logprobs_is_true():
    assert chat_params(logprobs=True, top_logprobs=3).logprobs == 3
    assert chat_params(logprobs=True).logprobs == 0
    assert chat_params(logprobs=False).logprobs is None


def test_minus_one_means_the_whole_vocabulary():
    assert chat_params(logprobs=True, top_logprobs=-1, max_logprobs=-1).logprobs == 260
    error = chat_error(logprobs=True, top_logprobs=-1)
    assert error.message == "Requested sample logprobs of 260, which is greater than max allowed: 20"


def test_logprobs_above_the_server_limit_are_refused():
    assert chat_error(logprobs=True, top_logprobs=21).message == (
        "Requested sample logprobs of 21, which is greater than max allowed: 20"
    )
    assert completion_error(logprobs=25).message == (
        "Requested sample logprobs of 25, which is greater than max allowed: 20"
    )
    assert "Requested prompt logprobs of 30" in completion_error(prompt_logprobs=30).message


def test_top_logprobs_needs_logprobs():
    error = chat_error(top_logprobs=2)
    assert error.message == "when using `top_logprobs`, `logprobs` must be set to true."
    assert (
        "`top_logprobs` must be a positive value or -1." == chat_error(logprobs=True, top_logprobs=-2).message
    )


def test_completion_logprobs_must_not_be_negative():
    assert completion_error(logprobs=-1).message == "`logprobs` must be a positive value."
    assert completion_params(logprobs=5).logprobs == 5


def test_prompt_logprobs_rules():
    assert completion_params(prompt_logprobs=2).prompt_logprobs == 2
    assert completion_error(prompt_logprobs=-2).message == "`prompt_logprobs` must be a positive value or -1."
    error = completion_error(prompt_logprobs=1, stream=True)
    assert error.message == "`prompt_logprobs` are not available when `stream=True`."
    assert chat_error(prompt_logprobs=-1, stream=True).param == "prompt_logprobs"


def test_echo_asks_for_prompt_logprobs():
    assert completion_params(echo=True, logprobs=3).prompt_logprobs == 3
    assert completion_params(echo=True).prompt_logprobs is None
    assert chat_params(echo=True, logprobs=True, top_logprobs=2).prompt_logprobs == 2
    assert chat_params(echo=True, prompt_logprobs=1).prompt_logprobs == 1


def test_echo_with_zero_max_tokens_runs_one_engine_step():
    assert completion_params(echo=True, max_tokens=0).max_tokens == 1
    assert completion_error(max_tokens=0).message == "max_tokens must be at least 1, got 0."


# ---- structured outputs ----

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput(json=json.dumps(SCHEMA))),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutput(json=json.dumps(SCHEMA))),
        ({"structured_outputs": {"regex": "a+"}}, StructuredOutput(regex="a+")),
        ({"structured_outputs": {"choice": ["x", "y"]}}, StructuredOutput(choice=("x", "y"))),
        ({"structured_outputs": {"grammar": "start: 'a'"}}, StructuredOutput(grammar="start: 'a'")),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput(json_object=True)),
        ({"guided_json": SCHEMA}, StructuredOutput(json=json.dumps(SCHEMA))),
        ({"guided_regex": "[0-9]+"}, StructuredOutput(regex="[0-9]+")),
        ({"guided_choice": ["yes", "no"]}, StructuredOutput(choice=("yes", "no"))),
        ({"guided_grammar": "g"}, StructuredOutput(grammar="g")),
        (
            {"guided_regex": "a", "guided_whitespace_pattern": " ?"},
            StructuredOutput(regex="a", whitespace_pattern=" ?"),
        ),
        (
            {"structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
            StructuredOutput(regex="a", disable_any_whitespace=True),
        ),
        ({"response_format": {"type": "json_object"}}, StructuredOutput(json_object=True)),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
            StructuredOutput(json=json.dumps(SCHEMA)),
        ),
        ({"response_format": {"type": "text"}}, None),
        ({}, None),
    ],
)
def test_constraints_map_to_the_engine(fields, expected):
    assert chat_params(**fields).structured == expected
    assert completion_params(**fields).structured == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"structured_outputs": {"json": SCHEMA, "regex": "a"}},
        {"guided_json": SCHEMA, "guided_choice": ["a"]},
        {"guided_regex": "a", "response_format": {"type": "json_object"}},
        {"structured_outputs": {"choice": ["a"]}, "guided_regex": "b"},
    ],
)
def test_at_most_one_constraint(fields):
    error = chat_error(**fields)
    assert "only use one kind of structured outputs constraint" in error.message


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"guided_json": "{not json"}, "not valid JSON"),
        ({"guided_json": "[1]"}, "must be an object"),
        ({"guided_choice": []}, "at least one choice"),
        ({"response_format": {"type": "json_schema"}}, "'json_schema' field must be provided"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, "schema"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "not supported"),
    ],
)
def test_malformed_constraints_are_refused(fields, fragment):
    assert fragment in chat_error(**fields).message


# ---- request-level rules ----


def test_stream_options_need_stream():
    error = chat_error(stream_options={"include_usage": None})
    assert error.message == "Stream options can only be defined when `stream=True`."
    assert completion_error(stream_options={"include_usage": True}).param == "stream_options"
    assert chat_params(stream=True, stream_options={"include_usage": True}).n == 1


def test_suffix_is_not_supported():
    assert completion_error(suffix="x").message == "suffix is not currently supported"


@pytest.mark.parametrize("prompt", [None, "", []])
def test_completion_needs_a_prompt(prompt):
    assert (
        completion_error(prompt=prompt).message
        == "Either prompt or prompt_embeds must be provided and non-empty."
    )


def test_prompt_embeds_are_refused():
    assert "prompt_embeds" in completion_error(prompt_embeds="AAAA").message


def test_generation_prompt_and_continue_final_message_are_exclusive():
    error = chat_error(continue_final_message=True)
    assert "continue_final_message" in error.message and "add_generation_prompt" in error.message
    assert chat_params(continue_final_message=True, add_generation_prompt=False).n == 1
    with pytest.raises(ProtocolError):
        request = decode_request(
            json.dumps({"messages": USER, "continue_final_message": True}).encode(), TokenizeChatRequest
        )
        check_tokenize_chat_request(request)


def test_cache_salt_must_be_a_non_empty_string():
    assert (
        chat_error(cache_salt="").message == "Parameter 'cache_salt' must be a non-empty string if provided."
    )
    assert chat_params(cache_salt="s").n == 1


def test_priority_needs_priority_scheduling():
    error = chat_error(priority=1)
    assert "Priority scheduling is not enabled" in error.message and error.param == "priority"
    allowed = chat_sampling_params(chat(priority=5), model(), PROMPT_LEN, MAX_LOGPROBS, allow_priority=True)
    assert allowed.n == 1


def test_per_request_logits_processors_are_refused():
    assert "logits_processors" in chat_error(logits_processors=["my.module.Proc"]).message


def test_stop_strings_are_listed():
    assert stop_strings("x") == ["x"]
    assert stop_strings(["a", "b"]) == ["a", "b"]
    assert stop_strings(None) == []


# ---- tool_choice ----


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"tool_choice": "auto"}, "When using `tool_choice`, `tools` must be set."),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "Invalid value for `tool_choice`: sometimes!"),
        ({"tools": TOOLS, "tool_choice": {}}, "Invalid value for `function`"),
        ({"tools": TOOLS, "tool_choice": {"function": {}}}, "Expected field `name` in `function`"),
        ({"tools": TOOLS, "tool_choice": {"function": {"name": ""}}}, "Invalid `name` in `function`"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
        ),
    ],
)
def test_tool_choice_rules(fields, fragment):
    error = chat_error(**fields)
    assert fragment in error.message and error.param == "tool_choice"


def test_tool_choice_none_and_auto_do_not_constrain_the_output():
    assert chat_params(tools=TOOLS).structured is None
    assert chat_params(tools=TOOLS, tool_choice="none").structured is None
    assert chat_params(tool_choice="none").structured is None


def test_named_tool_choice_constrains_the_output_to_its_parameters():
    params = chat_params(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(params.structured.json) == TOOLS[0]["function"]["parameters"]
    params = chat_params(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(params.structured.json) == {"type": "object", "properties": {}}


def test_required_tool_choice_constrains_the_output_to_a_list_of_calls():
    schema = tool_choice_schema(chat(tools=TOOLS, tool_choice="required"))
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert schema["$defs"] == {"City": {"type": "string"}}
    first, second = schema["items"]["anyOf"]
    assert first["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert "$defs" not in first["properties"]["parameters"]
    assert second["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert first["required"] == ["name", "parameters"]
    params = chat_params(tools=TOOLS, tool_choice="required")
    assert json.loads(params.structured.json) == schema


# ---- prompt and context length ----


def test_prompt_filling_the_context_is_refused():
    with pytest.raises(ProtocolError) as info:
        check_context_length(256, None, 256, "chat")
    assert info.value.status == 400
    assert info.value.message == (
        "This model's maximum context length is 256 tokens. However, your request has 256 input tokens. "
        "Please reduce the length of the input messages."
    )


def test_max_tokens_beyond_the_context_is_refused():
    with pytest.raises(ProtocolError) as info:
        check_context_length(100, 200, 256, "completion")
    assert info.value.message == (
        "'max_tokens' or 'max_completion_tokens' is too large: 200. This model's maximum context length is "
        "256 tokens and your request has 100 input tokens (200 > 256 - 100)."
    )
    check_context_length(100, 156, 256, "chat")


def test_context_length_is_checked_by_the_mapping():
    assert "maximum context length is 256 tokens" in chat_error(prompt_len=300).message
    assert "is too large: 250" in chat_error(max_completion_tokens=250).message
    assert "is too large: 16" in completion_error(prompt_len=250).message


def test_prompt_token_ids_must_be_non_empty_and_in_vocab():
    check_prompt_token_ids([1, 259], 260)
    with pytest.raises(ProtocolError, match="The decoder prompt cannot be empty"):
        check_prompt_token_ids([], 260)
    with pytest.raises(ProtocolError, match="Token id 260 is out of vocabulary"):
        check_prompt_token_ids([1, 260], 260)
    with pytest.raises(ProtocolError, match="Token id -1 is out of vocabulary"):
        check_prompt_token_ids([-1], 260)


def test_truncation_length():
    assert truncation_length(None, 256) is None
    assert truncation_length(-1, 256) == 256
    assert truncation_length(10, 256) == 10
    with pytest.raises(ProtocolError, match="is greater than max_model_len"):
        truncation_length(300, 256)


# ---- nothing a client sends escapes the rules as anything but a 4xx ----

_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(-3, 3) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
_FIELD_NAMES = [
    "n", "best_of", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "max_tokens", "max_completion_tokens", "min_tokens", "logprobs", "top_logprobs",
    "prompt_logprobs", "echo", "stream", "stream_options", "stop", "stop_token_ids", "logit_bias",
    "allowed_token_ids", "bad_words", "seed", "tools", "tool_choice", "response_format", "structured_outputs",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "priority", "cache_salt", "suffix",
    "use_beam_search", "add_generation_prompt", "continue_final_message",
]  # fmt: skip
_FIELDS = st.dictionaries(st.sampled_from(_FIELD_NAMES), _VALUE, max_size=6)


def _decoded_or_none(fields: dict, kind):
    try:
        return decode_request(json.dumps(fields).encode(), kind)
    except ProtocolError:
        return None


@settings(max_examples=400, deadline=None)
@given(_FIELDS, st.integers(0, 300))
def test_any_chat_request_maps_or_is_a_400(fields, prompt_len):
    request = _decoded_or_none({"messages": USER, **fields}, ChatCompletionRequest)
    if request is None:
        return
    try:
        params = chat_sampling_params(request, model(), prompt_len, MAX_LOGPROBS)
    except ProtocolError as error:
        assert error.status == 400
    else:
        assert 1 <= params.max_tokens <= 256 - prompt_len


@settings(max_examples=400, deadline=None)
@given(_FIELDS, st.integers(0, 300))
def test_any_completion_request_maps_or_is_a_400(fields, prompt_len):
    request = _decoded_or_none({"prompt": "hi", **fields}, CompletionRequest)
    if request is None:
        return
    try:
        params = completion_sampling_params(request, model(), prompt_len, MAX_LOGPROBS)
    except ProtocolError as error:
        assert error.status == 400
    else:
        assert params.max_tokens >= 1 and params.n >= 1


def test_n_and_best_of_are_capped_so_a_request_cannot_exhaust_the_server():
    from protocol.requests import CompletionRequest, decode_request
    from protocol.validation import MAX_N, check_completion_request

    for field in ("n", "best_of"):
        body = {"prompt": "hi", field: MAX_N + 1}
        with pytest.raises(ProtocolError) as info:
            check_completion_request(decode_request(json.dumps(body).encode(), CompletionRequest))
        assert info.value.status == 400 and info.value.param == field
