from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.tiny_models import build_model


@pytest.fixture(scope="session", autouse=True)
def float32_by_default():
    """These tests compare against float32 references (transformers, hand-computed logits), so `auto`
    must mean float32 here even on CPUs where it means bfloat16 (see `engine.loader.resolve_dtype`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("engine.loader.cpu_has_native_bf16", lambda *args: False)
        yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama HF folder (config.json, safetensors, tokenizer.json, chat template)."""
    return build_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")
