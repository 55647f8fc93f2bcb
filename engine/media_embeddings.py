"""Media items to input embeddings for one step: the vision tower runs once per image, not per chunk.

A prompt's image fills a run of placeholder positions. Chunked prefill may split that run over
several steps, and a prefix-cache hit may start a sequence in the middle of it; each step needs
only the rows of its own chunk. So an item's embeddings are computed whole, the first time a step
needs any of its rows, and kept in a small cache keyed by the item's content hash (vLLM's encoder
cache): the next chunk of the same prompt, or another request with the same image, reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from engine.attention import SequenceSpan
from engine.item_cache import ItemCache
from protocol.engine_api import MediaInput


class VisionLanguageModel(Protocol):
    """What a model that takes images gives the runner (engine.models.llava)."""

    def pixel_values(self, data: bytes, shape: tuple[int, int, int]) -> torch.Tensor: ...

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class MediaEmbedder:
    """Turns the media rows of a step into `(rows, values)` for the model's input embeddings."""

    def __init__(self, model: VisionLanguageModel, max_cached_items: int = 64) -> None:
        self.model = model
        parameters = getattr(model, "parameters", None)
        self.device = next(iter(parameters())).device if parameters is not None else torch.device("cpu")
        self._cache: ItemCache[torch.Tensor] = ItemCache(max_cached_items)

    def step_embeds(self, spans: Sequence[SequenceSpan]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows of this step (flattened over spans, in order) whose embedding an item replaces."""
        wanted: list[tuple[int, MediaInput, int, int]] = []  # (first row, item, first, end offset in item)
        base = 0
        for span in spans:
            start, end = span.start, span.start + len(span.token_ids)
            for item in span.media:
                first, last = max(start, item.offset), min(end, item.offset + item.length)
                if first < last:
                    wanted.append((base + first - start, item, first - item.offset, last - item.offset))
            base += len(span.token_ids)
        if not wanted:
            return None
        self._compute([item for _, item, _, _ in wanted])
        rows, values = [], []
        for row, item, first, last in wanted:
            rows.append(torch.arange(row, row + last - first))
            values.append(self._cache[item.hash][first:last])
        self._cache.trim(in_use=len({item.hash for _, item, _, _ in wanted}))
        return torch.cat(rows).to(values[0].device), torch.cat(values)

    def _compute(self, items: Sequence[MediaInput]) -> None:
        """Embed the images not cached yet, all in one vision-tower batch (equal shapes stack)."""
        by_shape: dict[tuple[int, ...], list[MediaInput]] = {}
        for item in self._cache.missing(items):
            if item.kind == "image_embeds":  # precomputed by the client: the rows as they are
                rows = torch.frombuffer(bytearray(item.data), dtype=torch.float32).view(item.shape)
                self._cache[item.hash] = rows.to(self.device)
            elif item.kind == "image":
                by_shape.setdefault(item.shape, []).append(item)
            else:
                raise ValueError(f"this model takes images only, not {item.kind}")
        for group in by_shape.values():
            pixels = torch.stack([self.model.pixel_values(item.data, item.shape) for item in group])  # type: ignore[arg-type]
            embeds = self.model.embed_images(pixels)
            for item, rows in zip(group, embeds, strict=True):
                if rows.shape[0] != item.length:
                    raise ValueError(f"an image gives {rows.shape[0]} embeddings; its run has {item.length} positions")
                self._cache[item.hash] = rows
