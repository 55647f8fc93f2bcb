"""The model's tokenizer, satisfying `protocol.tokenizer.Tokenizer` structurally.

Backed by a transformers fast tokenizer. `encode` goes through transformers (it knows the
model's BOS handling); `decode` and `convert_ids_to_tokens` call the Rust `tokenizers` object
directly, because they run once per generated token on the event loop and the transformers
wrapper adds Python overhead there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.model_files import cache_dir

if TYPE_CHECKING:  # transformers is imported where it is used: its lazy modules cost start-up time
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Bump when what the cache holds, or how it is read back, changes: old entries are then ignored.
_GGUF_TOKENIZER_CACHE_FORMAT = 1


class HFTokenizer:
    def __init__(
        self,
        hf_tokenizer: PreTrainedTokenizerBase,
        vocab_size: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ):
        self.hf = hf_tokenizer
        self._backend = hf_tokenizer.backend_tokenizer
        self._vocab_size = vocab_size or len(hf_tokenizer)
        self._backend_size = self._backend.get_vocab_size(with_added_tokens=True)
        # Qwen2 pads its embeddings past the vocabulary: such ids have no string and decode to nothing
        self._has_padding = self._vocab_size > self._backend_size
        eos = {int(i) for i in extra_eos_token_ids}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self._eos_token_ids = frozenset(eos)
        specials = set(hf_tokenizer.all_special_ids)
        specials.update(i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special)
        self._special_ids = frozenset(specials)
        template = chat_template if chat_template is not None else hf_tokenizer.chat_template
        self._chat_template = template if isinstance(template, str) else None
        # transformers' optional space clean-up ("a ." -> "a."); when on, decode must go through it
        self._clean_up = bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))

    # ---- constructors ----

    @classmethod
    def from_folder(
        cls, folder: str | Path, vocab_size: int | None = None, extra_eos_token_ids: Iterable[int] = ()
    ):
        """An HF folder: tokenizer.json + tokenizer_config.json, chat template from there or chat_template.jinja."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        template = None
        jinja = folder / "chat_template.jinja"
        if not isinstance(hf.chat_template, str) and jinja.is_file():
            template = jinja.read_text()
        return cls(hf, vocab_size, extra_eos_token_ids, template)

    @classmethod
    def from_gguf(
        cls, path: str | Path, vocab_size: int | None = None, extra_eos_token_ids: Iterable[int] = ()
    ):
        """Convert the vocabulary stored in a GGUF file, as transformers' `gguf_file=` loading does."""
        path = Path(path)
        return cls(_gguf_tokenizer(path), vocab_size, extra_eos_token_ids)

    # ---- protocol.tokenizer.Tokenizer ----

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def bos_token(self) -> str | None:
        return self.hf.bos_token

    @property
    def eos_token(self) -> str | None:
        return self.hf.eos_token

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in token_ids if 0 <= i < self._backend_size] if self._has_padding else list(token_ids)
        if self._clean_up:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """Vocabulary strings; ids past the tokenizer's vocabulary (padded embeddings) give ''."""
        id_to_token = self._backend.id_to_token
        return [id_to_token(i) or "" for i in token_ids]

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json's settings as loaded, plus `tokenizer_class`, as plain JSON data.

        What vLLM's /tokenizer_info serves: transformers' `init_kwargs` without the vocabulary
        file paths, special tokens as their text. Taken here, at load, because the protocol core
        that answers the route reads no files and knows no transformers types."""
        config = {key: value for key, value in self.hf.init_kwargs.items() if key not in ("vocab_file", "merges_file")}
        plain = _json_data(config)
        plain["tokenizer_class"] = type(self.hf).__name__
        if self._chat_template is not None:
            plain["chat_template"] = self._chat_template
        return plain

    def encode_pair(
        self, text: str, text_pair: str, add_special_tokens: bool = True, *, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """A sentence pair joined as the model was trained (`[CLS] a [SEP] b [SEP]` for BERT), with
        its token type ids (zeros when the tokenizer has none); `max_length` truncates longest first."""
        truncation = {} if max_length is None else {"truncation": "longest_first", "max_length": max_length}
        encoded = self.hf(text, text_pair, add_special_tokens=add_special_tokens, **truncation)
        ids = [int(i) for i in encoded["input_ids"]]
        types = encoded.get("token_type_ids")
        return ids, [int(t) for t in types] if types is not None else [0] * len(ids)


def _json_data(value: Any) -> Any:
    """`value` as JSON data: an AddedToken becomes its text (as vLLM serves it), mapping keys
    strings, tuples lists, and anything else JSON cannot hold its `str`."""
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    content = getattr(value, "content", None)
    if isinstance(content, str):  # tokenizers' AddedToken
        return content
    if isinstance(value, dict):
        return {str(key): _json_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_data(item) for item in value]
    return str(value)


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The GGUF file's vocabulary as a fast tokenizer: from the conversion cache when it holds this file
    (same path, size and mtime, same transformers and tokenizers versions), else converted and cached."""
    started = time.perf_counter()
    entry = gguf_tokenizer_cache_entry(path)
    cached = _read_cached_gguf_tokenizer(entry) if entry is not None else None
    if cached is not None:
        logger.info(
            "loaded the converted GGUF tokenizer from %s in %.2f s", entry, time.perf_counter() - started
        )
        return cached
    try:  # the conversion AutoTokenizer(gguf_file=...) runs, without its slow full-file config parse
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # other transformers versions keep these helpers elsewhere
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    kwargs = {**tokenizer_config, **extra}
    if entry is not None:
        _write_cached_gguf_tokenizer(entry, backend.to_str(), kwargs)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    logger.info("converted the GGUF tokenizer of %s in %.2f s", path.name, time.perf_counter() - started)
    return tokenizer


def gguf_tokenizer_cache_entry(path: Path) -> Path | None:
    """The cache folder for `path`'s converted tokenizer: named by the file (resolved path, size,
    mtime in ns) and by what converts it (transformers, tokenizers, this cache's format), so an
    edited or replaced file, or an upgraded converter, misses. None when the file cannot be stat'ed."""
    try:
        resolved = path.resolve()
        stat = resolved.stat()
        import tokenizers
        import transformers
    except (OSError, ImportError):
        return None
    key = json.dumps(
        [
            str(resolved),
            stat.st_size,
            stat.st_mtime_ns,
            transformers.__version__,
            tokenizers.__version__,
            _GGUF_TOKENIZER_CACHE_FORMAT,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"{resolved.stem}-{digest}"


def _read_cached_gguf_tokenizer(entry: Path) -> PreTrainedTokenizerBase | None:
    try:
        text = (entry / "tokenizer.json").read_text(encoding="utf-8")
        kwargs = json.loads((entry / "init.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not cached (or unreadable): convert afresh
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **kwargs)
    except Exception:  # noqa: BLE001 - a damaged entry must not stop the load: convert afresh
        logger.warning("ignoring the damaged tokenizer cache entry %s", entry, exc_info=True)
        return None


def _write_cached_gguf_tokenizer(entry: Path, tokenizer_json: str, kwargs: dict[str, Any]) -> None:
    """Write the entry into a temporary folder renamed into place, so a crash leaves no half entry.
    Best effort: a cache that cannot be written (read-only home, arguments that are not JSON) is skipped."""
    try:
        init = json.dumps(kwargs)
    except (TypeError, ValueError):
        logger.debug("not caching the GGUF tokenizer: its arguments are not JSON")
        return
    staging: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        (staging / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (staging / "init.json").write_text(init, encoding="utf-8")
        os.rename(staging, entry)
        staging = None
    except OSError as exc:  # another process won the race, or nowhere to write
        logger.debug("not caching the GGUF tokenizer at %s: %s", entry, exc)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
