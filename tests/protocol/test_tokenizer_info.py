"""GET /tokenizer_info: vLLM's opt-in route showing the tokenizer's configuration."""

from __future__ import annotations

import json

from protocol.testing import tiny_pooling_model, tiny_served_model
from tests.protocol.test_app import error_of, make_app, respond

HF_CONFIG = {
    "tokenizer_class": "LlamaTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "model_max_length": 2048,
    "added_tokens_decoder": {"0": "<unk>", "1": "<s>", "2": "</s>"},
}


def served_with_config(name: str = "tiny-byte-model", **overrides):
    model = tiny_served_model(name=name)
    model.tokenizer_config = {**HF_CONFIG, **overrides}
    return model


def info(app, target: str = "/tokenizer_info", headers=()):
    status, response_headers, body = respond(app, "GET", target, headers=headers)
    assert status == 200 and response_headers[b"content-type"] == b"application/json"
    return json.loads(body)


def test_absent_unless_enabled_as_in_vllm():
    app = make_app(models=[served_with_config()])
    status, error = error_of(respond(app, "GET", "/tokenizer_info", headers=()))
    assert status == 404 and error["message"] == "Not Found"
    assert error_of(respond(app, "OPTIONS", "/tokenizer_info", headers=()))[0] == 404  # no route to describe


def test_serves_the_tokenizer_config_with_the_models_chat_template():
    model = served_with_config()
    body = info(make_app(models=[model], enable_tokenizer_info_endpoint=True))
    assert body == {**HF_CONFIG, "chat_template": model.tokenizer.chat_template}


def test_the_servers_chat_template_replaces_the_models():
    app = make_app(
        models=[served_with_config(chat_template="the model's")],
        enable_tokenizer_info_endpoint=True,
        chat_template="{{ messages }}",
    )
    assert info(app)["chat_template"] == "{{ messages }}"


def test_a_tokenizer_without_a_config_still_names_its_class_and_special_tokens():
    body = info(make_app(enable_tokenizer_info_endpoint=True))
    assert body["tokenizer_class"] == "ByteTokenizer"
    assert (body["bos_token"], body["eos_token"]) == ("<s>", "</s>")
    assert "<|im_start|>" in body["chat_template"]


def test_the_model_query_parameter_picks_one_of_several_models():
    models = [served_with_config(), tiny_pooling_model(name="embedder")]
    models[1].tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    app = make_app(models=models, enable_tokenizer_info_endpoint=True)
    assert info(app)["tokenizer_class"] == "LlamaTokenizerFast"  # no model named: the first
    assert info(app, "/tokenizer_info?model=embedder")["do_lower_case"] is True
    status, error = error_of(respond(app, "GET", "/tokenizer_info?model=nope", headers=()))
    assert status == 404 and error["param"] == "model"


def test_needs_the_api_key_and_answers_under_the_root_path():
    app = make_app(
        models=[served_with_config()], enable_tokenizer_info_endpoint=True, api_keys=["k"], root_path="/llm"
    )
    status, _, body = respond(app, "GET", "/tokenizer_info", headers=())
    assert status == 401 and json.loads(body) == {"error": "Unauthorized"}
    key = ((b"authorization", b"Bearer k"),)
    assert info(app, "/llm/tokenizer_info", headers=key)["tokenizer_class"] == "LlamaTokenizerFast"
    status, headers, _ = respond(app, "POST", "/tokenizer_info", headers=key)
    assert status == 405 and headers[b"allow"] == b"GET"
