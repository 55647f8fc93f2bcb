"""A per-item cache keyed by content hash, least recently used first out: the media encoders' cache.

Why a cache at all: an image's embeddings or an audio window's cross-attention keys are needed by
every step that touches the item (chunks of one prompt, every decode step of a transcription) and by
any other request with the same content; computing them once per item is the point. Trimming runs
after a step has gathered its items (`trim`) and never drops the items the step used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Generic, TypeVar

from protocol.engine_api import MediaInput

V = TypeVar("V")


class ItemCache(Generic[V]):
    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._values: OrderedDict[str, V] = OrderedDict()

    def missing(self, items: Iterable[MediaInput]) -> list[MediaInput]:
        """The items not cached, one per hash, in order; the cached ones become the most recent."""
        missing: dict[str, MediaInput] = {}
        for item in items:
            if item.hash in self._values:
                self._values.move_to_end(item.hash)
            else:
                missing.setdefault(item.hash, item)
        return list(missing.values())

    def __setitem__(self, key: str, value: V) -> None:
        self._values[key] = value

    def __getitem__(self, key: str) -> V:
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def trim(self, in_use: int = 0) -> None:
        """Drop the least recently used values past the bound, never the `in_use` most recent ones
        (the step's own items: `missing` and a store make them the most recent). A step with more
        items than the bound keeps them all: dropping one would encode it again at the next step,
        every step, for as long as its sequence runs."""
        while len(self._values) > max(self.max_items, in_use):
            self._values.popitem(last=False)
