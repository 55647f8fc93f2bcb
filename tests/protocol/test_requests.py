"""Request decoding (field set, defaults, pydantic-style 400s), response shapes and the fake tokenizer."""

from __future__ import annotations

import json

import jinja2
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.requests import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    decode_request,
    decode_tokenize_request,
    named_tool_choice,
)
from protocol.responses import (
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeResponse,
    PromptTokenUsageInfo,
    TokenizeResponse,
    UsageInfo,
    clamp_logprob,
    encode,
    model_list,
    usage_chunk,
)
from protocol.testing import BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, ByteTokenizer, tiny_served_model
from protocol.tokenizer import Tokenizer

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def chat(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", USER)
    return decode_request(body(**fields), ChatCompletionRequest)


def refused(raw: bytes, kind=ChatCompletionRequest) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(raw, kind)
    assert info.value.status == 400
    assert info.value.type == "BadRequestError"
    return info.value


# ---- decoding: what is accepted ----


def test_chat_request_defaults_follow_vllm():
    request = chat()
    assert request.model is None
    assert request.n == 1 and request.temperature is None and request.top_p is None
    assert request.logprobs is False and request.top_logprobs == 0
    assert request.max_tokens is None and request.max_completion_tokens is None
    assert request.stop == [] and request.stop_token_ids == [] and request.bad_words == []
    assert request.stream is False and request.stream_options is None
    assert request.tool_choice == "none" and request.tools is None
    assert request.add_generation_prompt is True and request.continue_final_message is False
    assert request.add_special_tokens is False and request.skip_special_tokens is True
    assert request.include_reasoning is True and request.parallel_tool_calls is True
    assert request.priority == 0 and request.request_id is None and request.length_penalty == 1.0


def test_completion_request_defaults_follow_vllm():
    request = decode_request(body(prompt="hi"), CompletionRequest)
    assert request.max_tokens == 16 and request.n == 1 and request.echo is False
    assert request.logprobs is None and request.add_special_tokens is True
    assert request.suffix is None and request.stop == []


def test_unknown_fields_are_accepted_and_extra_message_keys_survive():
    messages = [
        {"role": "system", "content": "be brief", "x-trace": 7},
        {"role": "narrator", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"},
    ]
    request = chat(messages=messages, some_future_field={"a": 1}, user="u1")
    assert request.messages == messages


def test_every_vllm_extra_field_is_decoded():
    request = chat(
        echo=True,
        add_generation_prompt=False,
        continue_final_message=True,
        documents=[{"title": "t", "text": "x"}],
        chat_template="{{ x }}",
        chat_template_kwargs={"enable_thinking": False},
        structured_outputs={"regex": "a+", "disable_any_whitespace": True},
        priority=3,
        request_id="abc",
        return_tokens_as_token_ids=True,
        return_token_ids=True,
        cache_salt="salt",
        kv_transfer_params={"k": 1},
        vllm_xargs={"x": [1, 2]},
        truncate_prompt_tokens=-1,
        reasoning_effort="low",
        guided_json={"type": "object"},
        guided_whitespace_pattern=r"\s*",
        guided_decoding_backend="outlines",
    )
    assert request.structured_outputs.regex == "a+" and request.structured_outputs.disable_any_whitespace
    assert request.guided_json == {"type": "object"} and request.guided_decoding_backend == "outlines"
    assert request.vllm_xargs == {"x": [1, 2]} and request.truncate_prompt_tokens == -1


def test_response_format_json_schema_reads_the_schema_key():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert request.response_format.json_schema.schema == schema


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]], []])
def test_every_prompt_shape_is_accepted(prompt):
    assert decode_request(body(prompt=prompt), CompletionRequest).prompt == prompt


def test_seed_accepts_the_int64_range():
    assert chat(seed=INT64_MIN).seed == INT64_MIN
    assert chat(seed=INT64_MAX).seed == INT64_MAX


def test_tool_choice_defaults_to_auto_when_tools_are_given():
    assert chat(tools=TOOLS).tool_choice == "auto"
    assert chat(tools=TOOLS, tool_choice="none").tool_choice == "none"
    assert chat(tools=TOOLS, tool_choice=None).tool_choice is None


def test_required_tool_choice_with_no_tools_means_none():
    request = chat(tools=[], tool_choice="required")
    assert request.tool_choice == "none" and request.tools is None


def test_named_tool_choice_is_converted_on_demand():
    request = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named_tool_choice(request).function.name == "get_weather"
    assert named_tool_choice(chat(tools=TOOLS)) is None


def test_tokenize_body_with_messages_is_a_chat_request():
    request = decode_tokenize_request(body(messages=USER, return_token_strs=True))
    assert isinstance(request, TokenizeChatRequest)
    assert request.add_generation_prompt is True and request.add_special_tokens is False
    assert request.return_token_strs is True
    request = decode_tokenize_request(body(prompt="hello"))
    assert isinstance(request, TokenizeCompletionRequest) and request.add_special_tokens is True


def test_tokenize_body_that_is_not_json_is_a_400():
    with pytest.raises(ProtocolError) as info:
        decode_tokenize_request(b"{nope")
    assert info.value.status == 400 and "json_invalid" in info.value.message


def test_detokenize_request():
    assert decode_request(body(tokens=[1, 2]), DetokenizeRequest).tokens == [1, 2]
    assert "int_parsing" in refused(body(tokens=["a"]), DetokenizeRequest).message


# ---- decoding: pydantic-style refusals ----


@pytest.mark.parametrize(
    ("fields", "tokens", "param"),
    [
        ({"n": "abc"}, ["int_parsing", "'abc'", "n"], "n"),
        ({"n": 1.5}, ["int_from_float", "1.5"], "n"),
        ({"seed": INT64_MAX + 1}, ["less_than_equal", str(INT64_MAX + 1)], "seed"),
        ({"seed": INT64_MIN - 1}, ["greater_than_equal", str(INT64_MIN - 1)], "seed"),
        ({"temperature": "hot"}, ["float_parsing", "'hot'"], "temperature"),
        ({"stream": "yes"}, ["bool_parsing", "'yes'"], "stream"),
        ({"stop": 5}, ["string_type", "5"], "stop"),
        ({"truncate_prompt_tokens": -2}, ["greater_than_equal", "-1", "-2"], "truncate_prompt_tokens"),
        (
            {"response_format": {"type": "xml"}},
            ["literal_error", "'xml'", "'json_object'"],
            "response_format.type",
        ),
        ({"reasoning_effort": "huge"}, ["literal_error", "'huge'"], "reasoning_effort"),
        ({"tools": [{"type": "function"}]}, ["missing", "Field required"], "tools.0.function"),
        ({"messages": ["hello"]}, ["dict_type", "'hello'"], "messages.0"),
        ({"logit_bias": {"1": "x"}}, ["float_parsing"], "logit_bias"),
        ({"stream_options": []}, ["model_attributes_type"], "stream_options"),
    ],
)
def test_wrong_types_name_the_field_the_error_type_and_the_value(fields, tokens, param):
    fields.setdefault("messages", USER)
    error = refused(body(**fields))
    for token in tokens:
        assert token in error.message
    assert error.param == param


def test_missing_required_field_is_reported_as_missing():
    error = refused(b"{}")
    assert "messages" in error.message and "[type=missing" in error.message


@pytest.mark.parametrize(
    "messages",
    [[{"content": "no role"}], [{"role": 3, "content": "x"}], [{"role": "user", "content": 5}]],
)
def test_messages_need_a_string_role_and_valid_content(messages):
    error = refused(body(messages=messages))
    assert "value_error" in error.message and "messages[0]" in error.message


def test_content_parts_must_be_objects():
    error = refused(body(messages=[{"role": "user", "content": ["plain"]}]))
    assert "content[0]" in error.message


@pytest.mark.parametrize("prompt", [[1, "a"], [[1], "a"], [[1, "x"]], [True, False]])
def test_mixed_prompt_lists_are_refused(prompt):
    assert "`prompt` must be" in refused(body(prompt=prompt), CompletionRequest).message


@pytest.mark.parametrize("raw", [b"", b"{", b'{"messages": [}', b"nul", b'{"a": 1} trailing'])
def test_malformed_json_is_a_400_json_invalid(raw):
    assert "json_invalid" in refused(raw).message


def test_invalid_utf8_is_a_400():
    error = refused(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert "json_invalid" in error.message and "UTF-8" in error.message


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null"])
def test_a_json_value_that_is_not_an_object_is_a_400(raw):
    assert "model_attributes_type" in refused(raw).message


@pytest.mark.parametrize("depth", [900, 100_000])
def test_deeply_nested_json_is_a_400(depth):
    raw = b'{"messages": [{"role": ' + b"[" * depth + b"]" * depth + b"}]}"
    assert refused(raw).status == 400
    assert refused(b'{"n": ' + b"[" * depth + b"]" * depth + b"}").status == 400


def test_long_inputs_are_shortened_in_the_message():
    error = refused(body(n="x" * 5000))
    assert len(error.message) < 1500 and "..." in error.message


def test_error_body_is_the_openai_shape():
    error = refused(body(messages=USER, n="abc"))
    payload = json.loads(error.to_json())
    assert payload["error"]["code"] == 400 and payload["error"]["type"] == "BadRequestError"
    assert "int_parsing" in payload["error"]["message"] and payload["error"]["param"] == "n"


# ---- responses ----


def test_chat_response_carries_every_key():
    response = ChatCompletionResponse(
        id="chatcmpl-1",
        created=7,
        model="m",
        choices=[ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content="hi"))],
        usage=UsageInfo(prompt_tokens=3, completion_tokens=1, total_tokens=4),
    )
    data = json.loads(encode(response))
    assert data["object"] == "chat.completion"
    assert data["choices"][0] == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": "hi",
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [],
            "reasoning": None,
            "reasoning_content": None,
        },
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
        "token_ids": None,
    }
    assert data["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 4,
        "completion_tokens": 1,
        "prompt_tokens_details": None,
    }
    assert data["prompt_logprobs"] is None and data["system_fingerprint"] is None


def test_chat_chunks_leave_out_what_was_not_set():
    first = ChatCompletionStreamResponse(
        id="chatcmpl-1",
        created=7,
        model="m",
        choices=[
            ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))
        ],
    )
    assert json.loads(encode(first)) == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    last = ChatCompletionStreamResponse(
        id="chatcmpl-1",
        created=7,
        model="m",
        choices=[
            ChatCompletionResponseStreamChoice(
                index=1, delta=DeltaMessage(content="!"), finish_reason="stop", stop_reason=None
            )
        ],
    )
    choice = json.loads(encode(last))["choices"][0]
    assert choice == {
        "index": 1,
        "delta": {"content": "!"},
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
    }


def test_tool_call_deltas_carry_only_what_changed():
    first = DeltaToolCall(
        index=0, id="chatcmpl-tool-1", type="function", function=DeltaFunctionCall(name="f")
    )
    later = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments='{"a"'))
    assert json.loads(encode(DeltaMessage(tool_calls=[first, later]))) == {
        "tool_calls": [
            {"index": 0, "id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f"}},
            {"index": 0, "function": {"arguments": '{"a"'}},
        ]
    }


def test_completion_chunks_carry_every_key_with_nulls():
    chunk = CompletionStreamResponse(
        id="cmpl-1", created=7, model="m", choices=[CompletionResponseStreamChoice(index=0, text="x")]
    )
    assert json.loads(encode(chunk)) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 7,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "x",
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
                "token_ids": None,
                "prompt_token_ids": None,
            }
        ],
        "usage": None,
    }


@pytest.mark.parametrize("kind", ["chat.completion.chunk", "text_completion"])
def test_final_usage_chunk_has_no_choices_and_no_nulls(kind):
    chunk = usage_chunk("id-1", kind, 7, "m", UsageInfo(prompt_tokens=2, completion_tokens=3, total_tokens=5))
    assert json.loads(encode(chunk)) == {
        "id": "id-1",
        "object": kind,
        "created": 7,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3},
    }
    details = UsageInfo(
        prompt_tokens=2, total_tokens=2, prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=2)
    )
    assert json.loads(encode(usage_chunk("id-1", kind, 7, "m", details)))["usage"][
        "prompt_tokens_details"
    ] == {"cached_tokens": 2}


def test_chat_logprobs_shape_and_clamping():
    entry = ChatCompletionLogProbsContent(token="a", logprob=clamp_logprob(float("-inf")), bytes=[97])
    assert json.loads(encode(ChatCompletionLogProbs(content=[entry]))) == {
        "content": [{"token": "a", "logprob": -9999.0, "bytes": [97], "top_logprobs": []}]
    }
    assert clamp_logprob(-0.5) == -0.5


def test_model_list_uses_the_first_name_and_reports_context_length():
    model = tiny_served_model(max_model_len=128)
    model.names.append("alias")
    data = json.loads(encode(model_list([model])))
    assert data["object"] == "list"
    card = data["data"][0]
    assert card["id"] == "tiny-byte-model" and card["object"] == "model" and card["max_model_len"] == 128
    assert card["root"] == "tiny-byte-model" and card["parent"] is None and card["owned_by"] == "sansllm"
    assert card["permission"][0]["object"] == "model_permission"


def test_tokenize_and_detokenize_responses():
    response = TokenizeResponse(count=2, max_model_len=8, tokens=[1, 2])
    assert json.loads(encode(response)) == {
        "count": 2,
        "max_model_len": 8,
        "tokens": [1, 2],
        "token_strs": None,
    }
    assert json.loads(encode(DetokenizeResponse(prompt="hi"))) == {"prompt": "hi"}


# ---- the fake tokenizer ----

TOKENIZER = ByteTokenizer()


def test_byte_tokenizer_satisfies_the_tokenizer_protocol():
    assert isinstance(TOKENIZER, Tokenizer)
    assert TOKENIZER.vocab_size == 260
    assert TOKENIZER.eos_token_ids == {EOS_ID, IM_END_ID}
    assert TOKENIZER.all_special_ids == {256, 257, 258, 259}
    assert (TOKENIZER.bos_token, TOKENIZER.eos_token) == ("<s>", "</s>")


def test_multibyte_characters_span_several_tokens_and_round_trip():
    ids = TOKENIZER.encode("é🙂", add_special_tokens=False)
    assert ids == list("é🙂".encode())
    assert len(ids) == 6 and TOKENIZER.decode(ids) == "é🙂"
    assert TOKENIZER.decode(ids[:1]) == "\N{REPLACEMENT CHARACTER}"


def test_special_tokens_in_text_become_their_ids():
    ids = TOKENIZER.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids == [BOS_ID, IM_START_ID, *b"user\nhi", IM_END_ID]
    assert TOKENIZER.decode(ids) == "user\nhi"
    assert TOKENIZER.decode(ids, skip_special_tokens=False) == "<s><|im_start|>user\nhi<|im_end|>"


def test_convert_ids_to_tokens():
    assert TOKENIZER.convert_ids_to_tokens([104, 0xC3, BOS_ID, 10]) == ["h", "<0xC3>", "<s>", "<0x0A>"]


def test_out_of_vocab_ids_are_refused():
    with pytest.raises(ValueError):
        TOKENIZER.decode([260])


def test_chatml_template_renders_with_jinja():
    template = jinja2.Environment().from_string(TOKENIZER.chat_template)
    text = template.render(messages=USER, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert TOKENIZER.encode(text, add_special_tokens=False)[0] == IM_START_ID


def test_tiny_served_model():
    model = tiny_served_model(max_model_len=64)
    assert model.name == "tiny-byte-model" and model.max_model_len == 64 and model.tasks == {"generate"}
    assert isinstance(model.tokenizer, ByteTokenizer)
    assert msgspec.structs.asdict(model)["generation_defaults"] == {}


# ---- nothing a client sends escapes as anything but a request or a 400 ----

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = st.sampled_from(
    [
        "messages",
        "prompt",
        "n",
        "stop",
        "tools",
        "tool_choice",
        "seed",
        "response_format",
        "logit_bias",
        "stream",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_FIELDS, _JSON, max_size=5), st.sampled_from([ChatCompletionRequest, CompletionRequest])
)
def test_any_json_object_is_a_request_or_a_400(fields, kind):
    try:
        decode_request(json.dumps(fields).encode(), kind)
    except ProtocolError as error:
        assert error.status == 400


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_are_a_request_or_a_400(raw):
    try:
        decode_request(raw, CompletionRequest)
    except ProtocolError as error:
        assert error.status == 400
