"""From an encoder's hidden states to what pooling requests return: one vector per sequence, optionally
truncated (Matryoshka) and L2-normalised, or classifier scores through their activation.

Works on the flat, padding-free batches the models produce (rows of several sequences concatenated, split
by `seq_lens`); nothing here knows a model's internals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from engine.model_config import UnsupportedModelError

PoolingMethod = Literal["mean", "cls", "last"]

# sentence-transformers' Pooling config key -> our method
_ST_MODES: dict[str, PoolingMethod] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class PoolingConfig:
    """How an embedding model turns hidden states into its vector, by default."""

    method: PoolingMethod = "cls"
    normalize: bool = True


def pool(hidden: torch.Tensor, seq_lens: list[int], method: PoolingMethod) -> torch.Tensor:
    """hidden [T, H] of concatenated sequences -> float32 [B, H]: their mean, first ([CLS]) or last row.

    Float32 because these vectors are the output (a bfloat16 mean over hundreds of rows would lose digits);
    the mean is one `index_add_` over all rows, so its cost does not grow with the number of sequences.
    """
    if sum(seq_lens) != hidden.shape[0] or not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"seq_lens {seq_lens} do not split {hidden.shape[0]} rows into sequences")
    lens = torch.tensor(seq_lens, device=hidden.device)
    ends = lens.cumsum(0)
    if method == "cls":
        return hidden[ends - lens].float()
    if method == "last":
        return hidden[ends - 1].float()
    if method == "mean":
        owner = torch.repeat_interleave(torch.arange(len(seq_lens), device=hidden.device), lens)
        sums = hidden.new_zeros(len(seq_lens), hidden.shape[1], dtype=torch.float32)
        sums.index_add_(0, owner, hidden.float())
        return sums / lens[:, None]
    raise ValueError(f"unknown pooling method {method!r}; use mean, cls or last")


def embedding_output(vectors: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """[B, H] -> [B, d]: keep the first `dimensions` (Matryoshka), then L2-normalise, in that order (as
    vLLM does, so a truncated vector is a unit vector too)."""
    if dimensions is not None:
        if not 0 < dimensions <= vectors.shape[-1]:
            raise ValueError(f"dimensions must be between 1 and {vectors.shape[-1]}, got {dimensions}")
        vectors = vectors[..., :dimensions]
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


def classifier_activation(
    logits: torch.Tensor, use_activation: bool, problem_type: str | None = None
) -> torch.Tensor:
    """Logits [B, num_labels] -> scores: sigmoid for one label, softmax over several (vLLM's default for
    classification and cross-encoders); raw logits when `use_activation` is False.

    `problem_type` from the model's config (transformers' loss choice) overrides as vLLM does:
    "multi_label_classification" -> sigmoid per label, "regression" -> the raw values.
    """
    if not use_activation or problem_type == "regression":
        return logits
    if logits.shape[-1] == 1 or problem_type == "multi_label_classification":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def read_pooling_config(folder: Path) -> PoolingConfig:
    """The default pooling of the embedding model in `folder`.

    The rule: if the folder is a sentence-transformers model (`modules.json` naming a
    `sentence_transformers.models.Pooling` module), its method comes from that module's `config.json`
    (`pooling_mode_mean_tokens` -> mean, `pooling_mode_cls_token` -> cls, `pooling_mode_lasttoken` -> last;
    any other mode, or several at once, is refused), and vectors are normalised exactly when a
    `sentence_transformers.models.Normalize` module follows, so we return what sentence-transformers
    returns. Otherwise: CLS pooling, normalised (vLLM's default for BERT-family embedding models).
    """
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list):
        return PoolingConfig()
    pooling = next((m for m in modules if m.get("type") == _ST_POOLING), None)
    if pooling is None:
        return PoolingConfig()
    normalize = any(m.get("type") == _ST_NORMALIZE for m in modules)
    settings = _read_json(folder / pooling.get("path", "") / "config.json") or {}
    modes = sorted(
        key for key, value in settings.items() if key.startswith("pooling_mode_") and value is True
    )
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise UnsupportedModelError(
            f"{folder.name}: sentence-transformers pooling {', '.join(modes) or 'with no mode'} is not "
            f"supported; supported: one of {', '.join(_ST_MODES)}"
        )
    return PoolingConfig(method=_ST_MODES[modes[0]], normalize=normalize)


def _read_json(path: Path) -> object:
    return json.loads(path.read_text()) if path.is_file() else None
