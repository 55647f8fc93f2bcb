from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.tiny_models import build_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama HF folder (config.json, safetensors, tokenizer.json, chat template)."""
    return build_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")
