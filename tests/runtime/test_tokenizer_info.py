"""GET /tokenizer_info through the assembled server: the flag, the key, the tokenizer's config."""

from __future__ import annotations

import httpx

from protocol.testing import ByteTokenizer
from tests.runtime.fakes import ScriptedEngine
from tests.runtime.test_openai_client import MODEL, serve

CONFIG = {
    "tokenizer_class": "GPT2TokenizerFast",
    "eos_token": "<|im_end|>",
    "added_tokens_decoder": {"0": "<|endoftext|>"},
}


class ConfiguredTokenizer(ByteTokenizer):
    """A tokenizer that reports its configuration at load, as `engine.tokenizer.HFTokenizer` does."""

    def tokenizer_config(self) -> dict:
        return dict(CONFIG)


def test_tokenizer_info_is_served_behind_its_flag_and_the_key(runtime):
    engine = ScriptedEngine(tokenizer=ConfiguredTokenizer())
    with serve(runtime, "--enable-tokenizer-info-endpoint", "--api-key", "k", engine=engine) as server:
        assert httpx.get(f"{server.url}/tokenizer_info", timeout=30).status_code == 401
        response = httpx.get(
            f"{server.url}/tokenizer_info", params={"model": MODEL}, headers={"Authorization": "Bearer k"}, timeout=30
        )
        assert response.status_code == 200
        body = response.json()
        assert {key: body[key] for key in CONFIG} == CONFIG
        assert body["chat_template"] == engine.tokenizer.chat_template
    with serve(runtime, engine=ScriptedEngine(tokenizer=ConfiguredTokenizer())) as server:
        response = httpx.get(f"{server.url}/tokenizer_info", timeout=30)
        assert response.status_code == 404 and response.json()["error"]["code"] == 404
