"""engine.wheel_gguf: a GGUF split over wheels is downloaded once, joined, checked, and never installed."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.model_files import ModelNotFoundError, resolve_model
from engine.wheel_gguf import WheelGGUF, fetch, fetched, fetched_path


def tiny_gguf(path: Path, architecture: str) -> bytes:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def make_wheels(folder: Path, data: bytes, pieces: int) -> list[tuple[str, str]]:
    """`pieces` wheels named like the real ones, each holding one piece of `data`."""
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // pieces)
    parts = []
    for n in range(1, pieces + 1):
        member = f"fake_model_part{n}/data/part{n:02d}.bin"
        with zipfile.ZipFile(folder / f"fake_model_part{n}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"fake_model_part{n}/__init__.py", "")
            wheel.writestr(member, data[(n - 1) * step : n * step])
        parts.append((f"fake-model-part{n}==1.0", member))
    return parts


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SANSLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, bytes, WheelGGUF]:
    """Wheels as a package index would serve them, and the model they make up."""
    data = tiny_gguf(tmp_path / "model.gguf", "qwen2")
    index = tmp_path / "index"
    parts = make_wheels(index, data, 3)
    split = WheelGGUF("fake.gguf", tuple(parts), len(data), hashlib.sha256(data).hexdigest(), "qwen2")
    return index, data, split


def downloader(index: Path, calls: list[list[str]]):
    def download(requirements: list[str], folder: Path) -> None:
        calls.append(list(requirements))
        for requirement in requirements:
            name, _, version = requirement.partition("==")
            shutil.copy(index / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", folder)

    return download


def test_fetch_joins_the_pieces_once_and_later_starts_reuse_the_file(cache, published):
    index, data, split = published
    calls: list[list[str]] = []
    path = fetch(split, downloader(index, calls))
    assert path == fetched_path(split) and path.read_bytes() == data
    assert calls == [split.requirements]
    assert fetch(split, downloader(index, calls)) == path and len(calls) == 1  # nothing downloaded again
    assert fetched(split) == path
    (cache / "models" / "fake.gguf").write_bytes(data[:-1])  # changed since: not trusted any more
    with pytest.raises(ModelNotFoundError, match="make fetch-models"):
        fetched(split)
    assert fetch(split, downloader(index, calls)).read_bytes() == data and len(calls) == 1  # wheels kept


def test_a_wrong_checksum_leaves_no_file_that_looks_complete(cache, published):
    index, _, split = published
    wrong = WheelGGUF(split.filename, split.parts, split.size, "0" * 64, split.architecture)
    with pytest.raises(ModelNotFoundError, match="expected .* bytes with sha256 0000"):
        fetch(wrong, downloader(index, []))
    assert not fetched_path(wrong).exists()
    assert [p.name for p in (cache / "models").iterdir()] == []


def test_a_gguf_of_another_architecture_is_refused(cache, published):
    index, _, split = published
    other = WheelGGUF(split.filename, split.parts, split.size, split.sha256, "llama")
    with pytest.raises(ModelNotFoundError, match="architecture 'qwen2', expected 'llama'"):
        fetch(other, downloader(index, []))
    assert not fetched_path(other).exists()


def test_serving_the_model_before_fetching_says_how_to_fetch_it(cache):
    with pytest.raises(ModelNotFoundError, match="make fetch-models"):
        resolve_model("qwen2.5-coder-0.5b-instruct")
