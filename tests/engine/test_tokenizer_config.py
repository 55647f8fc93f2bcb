"""What /tokenizer_info serves is read from the HF tokenizer at load: plain JSON, as vLLM's."""

from __future__ import annotations

import json

from engine.model_files import DEFAULT_MODEL, resolve_model
from engine.tokenizer import HFTokenizer
from tests.engine.tiny_models import CHATML, train_tokenizer


def test_an_hf_folder_gives_its_tokenizer_config_as_json_data(tmp_path):
    train_tokenizer(tmp_path)
    config = HFTokenizer.from_folder(tmp_path).tokenizer_config()
    assert json.loads(json.dumps(config)) == config  # nothing JSON cannot carry
    assert config["tokenizer_class"] and isinstance(config["tokenizer_class"], str)
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert config["chat_template"] == CHATML
    # special tokens are their text (transformers holds AddedToken objects), file paths are left out
    assert set(config["added_tokens_decoder"].values()) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    assert "vocab_file" not in config and "merges_file" not in config


def test_the_packaged_gguf_model_reports_its_chat_template():
    source = resolve_model(DEFAULT_MODEL)
    tokenizer = HFTokenizer.from_gguf(source.path)
    config = tokenizer.tokenizer_config()
    assert json.loads(json.dumps(config)) == config
    assert config["chat_template"] == tokenizer.chat_template and "<|im_start|>" in config["chat_template"]
    assert config["eos_token"] == "<|im_end|>"
