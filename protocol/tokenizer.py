"""What the protocol core needs from a tokenizer.

The engine's loader provides an implementation backed by the model's HF tokenizer; tests inject
`protocol.testing.ByteTokenizer`. Keeping this a structural Protocol keeps `protocol/` free of
the `tokenizers`/`transformers` import cost and lets any server embed the core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts (ids are in [0, vocab_size))."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def all_special_ids(self) -> frozenset[int]: ...

    @property
    def bos_token(self) -> str | None: ...

    @property
    def eos_token(self) -> str | None: ...

    @property
    def chat_template(self) -> str | None:
        """The model's jinja2 chat template, or None."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Raw vocabulary strings (e.g. 'Ġthe'), as HF's method of the same name."""

    def encode_pair(
        self, text: str, text_pair: str, add_special_tokens: bool = True, *, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """A sentence pair as a cross-encoder reads it: (input ids, token type ids), as HF's
        `tokenizer(text, text_pair)` joins them (BERT: `[CLS] a [SEP] b [SEP]`, types 0..0 1..1;
        all zeros when the tokenizer has no segment ids).

        `max_length` (optional; callers pass it only to truncate) cuts the pair to that many ids,
        longest sequence first, as HF's `truncation="longest_first"` does."""
