"""Pooling request bodies: field sets and defaults, the two request styles, pydantic-style 400s."""

import json

import pytest

from protocol.errors import ProtocolError
from protocol.pooling_requests import (
    ClassificationChatRequest,
    ClassificationCompletionRequest,
    EmbeddingChatRequest,
    EmbeddingCompletionRequest,
    PoolingChatRequest,
    PoolingCompletionRequest,
    RerankDocumentIn,
    RerankRequest,
    ScoreRequest,
    activation_flag,
    decode_pooling_body,
)
from protocol.requests import decode_request
from protocol.testing import BOS_ID, EOS_ID, ByteTokenizer


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_embedding_defaults_are_vllms():
    request = decode_pooling_body(
        body(input="a", unknown_field=1), EmbeddingCompletionRequest, EmbeddingChatRequest
    )
    assert isinstance(request, EmbeddingCompletionRequest)
    assert (request.encoding_format, request.embed_dtype, request.endianness) == (
        "float",
        "float32",
        "native",
    )
    assert request.add_special_tokens is True and request.dimensions is None and request.normalize is None
    assert request.priority == 0 and request.request_id is None and request.truncate_prompt_tokens is None


def test_messages_pick_the_chat_style():
    chat = decode_pooling_body(
        body(messages=[{"role": "user", "content": "x"}]), EmbeddingCompletionRequest, EmbeddingChatRequest
    )
    assert isinstance(chat, EmbeddingChatRequest)
    assert chat.add_generation_prompt is False and chat.add_special_tokens is False
    assert chat.continue_final_message is False
    pooling = decode_pooling_body(
        body(messages=[], task="embed"), PoolingCompletionRequest, PoolingChatRequest
    )
    assert isinstance(pooling, PoolingChatRequest) and pooling.task == "embed"
    classify = decode_pooling_body(
        body(messages=[]), ClassificationCompletionRequest, ClassificationChatRequest
    )
    assert isinstance(classify, ClassificationChatRequest)
    broken = b'{"messages": ['
    with pytest.raises(ProtocolError) as error:
        decode_pooling_body(broken, EmbeddingCompletionRequest, EmbeddingChatRequest)
    assert "json_invalid" in error.value.message


@pytest.mark.parametrize("value", ["a", ["a", "b"], [1, 2], [[1], [2, 3]], []])
def test_input_forms(value):
    assert decode_request(body(input=value), EmbeddingCompletionRequest).input == value


@pytest.mark.parametrize("value", [["a", 1], [[1], "a"], [True], [[1.5]], [None], 3, None])
def test_other_inputs_are_400(value):
    with pytest.raises(ProtocolError) as error:
        decode_request(body(input=value), EmbeddingCompletionRequest)
    assert error.value.status == 400


def test_use_activation_spellings():
    assert activation_flag(decode_request(body(input="a"), PoolingCompletionRequest)) is None
    assert activation_flag(decode_request(body(input="a", softmax=False), PoolingCompletionRequest)) is False
    assert (
        activation_flag(decode_request(body(input="a", activation=True), ClassificationCompletionRequest))
        is True
    )
    request = decode_request(body(text_1="a", text_2="b", use_activation=False, softmax=True), ScoreRequest)
    assert activation_flag(request) is False  # the current name wins
    assert (
        activation_flag(decode_request(body(input="a", use_activation=True), EmbeddingCompletionRequest))
        is None
    )


def test_score_texts():
    assert decode_request(body(text_1="a", text_2=["b", "c"]), ScoreRequest).texts() == (
        ["a"],
        ["b", "c"],
        ("text_1", "text_2"),
    )
    assert decode_request(body(queries=["q"], items=["d"]), ScoreRequest).texts()[2] == ("queries", "items")
    with pytest.raises(ProtocolError):
        decode_request(body(text_1=1, text_2="b"), ScoreRequest)


def test_rerank_documents_as_strings_or_text_objects():
    request = decode_request(body(query="q", documents=["a", {"text": "b", "extra": 1}]), RerankRequest)
    assert request.documents == ["a", RerankDocumentIn(text="b")]
    assert request.document_texts() == ["a", "b"]
    assert request.top_n is None and request.return_documents is True
    with pytest.raises(ProtocolError) as error:
        decode_request(body(query="q", documents=[{"text": 3}]), RerankRequest)
    assert error.value.status == 400


def test_byte_tokenizer_pair_encoding():
    tokenizer = ByteTokenizer()
    assert tokenizer.encode_pair("ab", "c") == ([BOS_ID, *b"ab", EOS_ID, *b"c", EOS_ID], [0, 0, 0, 0, 1, 1])
    assert tokenizer.encode_pair("ab", "c", add_special_tokens=False) == ([*b"abc"], [0, 0, 1])
    # longest first: "abcd" loses two, then the tie takes from the pair
    assert tokenizer.encode_pair("abcd", "xy", max_length=6) == (
        [BOS_ID, *b"ab", EOS_ID, *b"x", EOS_ID],
        [0, 0, 0, 0, 1, 1],
    )
    assert tokenizer.encode_pair("abcd", "xy", max_length=2) == ([BOS_ID, EOS_ID, EOS_ID], [0, 0, 1])
    assert tokenizer.encode_pair("ab", "xy", max_length=100)[0] == [BOS_ID, *b"ab", EOS_ID, *b"xy", EOS_ID]
