"""The benchmark's view of model locations: the engine's resolver, spelled as HF transformers wants."""

from __future__ import annotations

from pathlib import Path

from engine import DEFAULT_MODEL as DEFAULT_MODEL_NAME
from engine import resolve_model as resolve_source

__all__ = ["DEFAULT_MODEL_NAME", "concrete_dtype", "hf_location", "resolve_model"]


def resolve_model(model: str | None) -> str:
    """A path for `model` (None: the default model), as the engine's loader resolves it."""
    return str(resolve_source(model or DEFAULT_MODEL_NAME).path)


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

    from engine import resolve_dtype

    return str(resolve_dtype(dtype, torch.device("cpu"))).removeprefix("torch.")
