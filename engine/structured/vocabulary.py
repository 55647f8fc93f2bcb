"""A tokenizer's vocabulary as the bytes each token stands for, as outlines-core's `Vocabulary`.

Guides are built over bytes, not vocabulary strings: a byte-level BPE token `Ġworld` is b" world",
a SentencePiece token `▁world` is b" world" and its byte-fallback token `<0x0A>` is b"\n".
Special tokens (chat markers, padding) are left out, so no constraint ever allows them; the end of
a constrained output is allowed through outlines' EOS id, which the mask copies to every EOS id of
the model (`ConstraintVocabulary.eos_token_ids`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes, reversed (`tokenizers`' ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def _is_byte_level(backend_json: dict[str, Any]) -> bool:
    def mentions(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(mentions(v) for v in node.values())
        if isinstance(node, list):
            return any(mentions(v) for v in node)
        return False

    return mentions(backend_json.get("decoder")) or mentions(backend_json.get("pre_tokenizer"))


def token_bytes(token: str, byte_level: bool) -> bytes | None:
    """The bytes a vocabulary string stands for; None when it cannot be mapped."""
    if byte_level:
        decoder = _byte_level_decoder()
        try:
            return bytes(decoder[char] for char in token)
        except KeyError:
            return None  # an added (non-special) token written as plain text
    match = _BYTE_FALLBACK.match(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")


@dataclass(frozen=True)
class ConstraintVocabulary:
    """What guides are compiled against: token bytes by id, the EOS ids, and a fingerprint that keys
    the compiled-guide cache (two tokenizers with the same tokens share guides)."""

    tokens: dict[bytes, list[int]]
    eos_token_id: int
    eos_token_ids: frozenset[int]
    vocab_size: int  # the logits' width (may exceed the tokenizer's: padded embeddings)
    fingerprint: str

    def outlines(self) -> Any:
        from outlines_core import Vocabulary

        return Vocabulary(self.eos_token_id, self.tokens)


def constraint_vocabulary(tokenizer: Any) -> ConstraintVocabulary:
    """Build from an `engine.tokenizer.HFTokenizer` (reads its Rust `tokenizers` backend)."""
    backend = tokenizer.hf.backend_tokenizer
    byte_level = _is_byte_level(json.loads(backend.to_str()))
    special = set(tokenizer.all_special_ids)
    eos_ids = frozenset(tokenizer.eos_token_ids)
    if not eos_ids:
        raise ValueError("structured output needs a tokenizer with an end-of-sequence token")
    tokens: dict[bytes, list[int]] = {}
    digest = hashlib.sha256(b"byte-level" if byte_level else b"sentencepiece")
    for token, token_id in sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
        if token_id in special or token_id in eos_ids or token_id >= tokenizer.vocab_size:
            continue
        raw = token_bytes(token, byte_level)
        if raw is None:
            raw = token.encode("utf-8")
        if not raw:
            continue
        tokens.setdefault(raw, []).append(token_id)
        digest.update(token_id.to_bytes(4, "little") + raw + b"\0")
    eos = min(eos_ids)
    digest.update(repr(sorted(eos_ids)).encode())
    return ConstraintVocabulary(tokens, eos, eos_ids, tokenizer.vocab_size, digest.hexdigest()[:16])
