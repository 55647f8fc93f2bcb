"""bad_words: a word's last token is banned whenever the output so far ends with the rest of it."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.processors.base import Admission, LogitsProcessor, RowRef
from engine.processors.indexing import fill_entries


@dataclass
class _Words:
    always: tuple[int, ...]  # one-token words: banned at every step
    prefixed: tuple[tuple[tuple[int, ...], int], ...]  # (prefix, last token) of longer words
    tail: deque[int]  # the last output tokens, as many as the longest prefix


class BadWords(LogitsProcessor):
    """State: the output's last few tokens (as many as the longest prefix), enough to tell which
    prefixes the output ends with; the work per step is the words' lengths, never the vocabulary."""

    def __init__(self) -> None:
        self._words: dict[str, _Words] = {}

    def admit(self, key: str, admission: Admission) -> bool:
        words = admission.params.bad_words_token_ids
        if not words:
            return False
        always = tuple(dict.fromkeys(word[0] for word in words if len(word) == 1))
        prefixed = tuple((tuple(word[:-1]), word[-1]) for word in words if len(word) > 1)
        longest = max((len(prefix) for prefix, _ in prefixed), default=0)
        self._words[key] = _Words(always, prefixed, deque(maxlen=longest))
        return True

    def apply(self, logits: torch.Tensor, rows: Sequence[int], refs: Sequence[RowRef]) -> None:
        row_index: list[int] = []
        tokens: list[int] = []
        for row, ref in zip(rows, refs, strict=True):
            banned = self._banned(self._words[ref.key], ref.draft)
            row_index.extend([row] * len(banned))
            tokens.extend(banned)
        fill_entries(logits, row_index, tokens, float("-inf"))

    def accept(self, key: str, token_ids: Sequence[int]) -> None:
        self._words[key].tail.extend(token_ids)

    def fork(self, parent: str, child: str) -> None:
        words = self._words[parent]
        self._words[child] = _Words(words.always, words.prefixed, deque(words.tail, maxlen=words.tail.maxlen))

    def release(self, key: str) -> None:
        del self._words[key]

    @staticmethod
    def _banned(words: _Words, draft: Sequence[int]) -> list[int]:
        banned = list(words.always)
        if not words.prefixed:
            return banned
        recent = list(words.tail) + list(draft) if draft else list(words.tail)
        for prefix, last in words.prefixed:
            if len(recent) >= len(prefix) and tuple(recent[len(recent) - len(prefix) :]) == prefix:
                banned.append(last)
        return banned
