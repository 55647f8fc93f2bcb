"""The encoder side of a speech model's step: each audio window encoded once, its cross-attention
keys and values kept while its sequence decodes.

A Whisper request is a decoder prompt plus one audio window (`MediaInput(kind="audio")`). Its
encoder runs once, the first time the sequence is scheduled, and every decoder step after that
attends over the same 1500 encoder frames through each layer's cross-attention. So the keys and
values of every layer are computed at once and kept, keyed by the window's content hash (two
requests with the same audio share them), in a cache bounded by item count; a step's items are
never evicted by that step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from engine.attention import SequenceSpan
from engine.item_cache import ItemCache
from protocol.engine_api import MediaInput

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: (keys, values) [frames, heads, head_dim]


class SpeechModel(Protocol):
    """What an encoder-decoder speech model gives the runner (engine.models.whisper)."""

    def input_features(self, samples: torch.Tensor) -> torch.Tensor: ...

    def encode(self, features: torch.Tensor) -> torch.Tensor: ...

    def cross_kv(self, encoded: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


class AudioEncoderCache:
    """Per step: the cross-attention keys and values of each span's audio, stacked in span order."""

    def __init__(self, model: SpeechModel, max_cached_items: int = 64) -> None:
        self.model = model
        parameters = getattr(model, "parameters", None)
        self.device = next(iter(parameters())).device if parameters is not None else torch.device("cpu")
        self._cache: ItemCache[LayerKV] = ItemCache(max_cached_items)

    def step_cross(self, spans: Sequence[SequenceSpan]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, (keys [S, frames, heads, head_dim], values) for the S spans in order."""
        items = [_audio_of(span) for span in spans]
        self._compute(items)
        per_span = [self._cache[item.hash] for item in items]
        stacked = [
            (torch.stack([kv[layer][0] for kv in per_span]), torch.stack([kv[layer][1] for kv in per_span]))
            for layer in range(len(per_span[0]))
        ]
        self._cache.trim(in_use=len({item.hash for item in items}))
        return stacked

    def _compute(self, items: Sequence[MediaInput]) -> None:
        """Encode the windows not cached yet, in one encoder batch."""
        missing = self._cache.missing(items)
        if not missing:
            return
        features = torch.stack(
            [
                self.model.input_features(torch.frombuffer(bytearray(item.data), dtype=torch.float32))
                for item in missing
            ]
        ).to(self.device)
        layers = self.model.cross_kv(self.model.encode(features))
        for index, item in enumerate(missing):
            self._cache[item.hash] = [(keys[index], values[index]) for keys, values in layers]


def _audio_of(span: SequenceSpan) -> MediaInput:
    audio = [item for item in span.media if item.kind == "audio"]
    if len(audio) != 1:
        raise ValueError(f"a speech model's sequence needs exactly one audio window, got {len(audio)}")
    return audio[0]
