"""C++ kernels for the CPU, compiled on first use with torch's extension builder.

Why C++ here when the rest of `kernels` is triton and torch: on the CPU, triton does not run (outside
its interpreter) and some kernels cannot be made fast from torch ops (see each source's header). The
sources are built once per machine into torch's extension cache (`build_directory()`: under
`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`) with `-O3 -march=native`, which is right because they are built where they
run, and with `-ffast-math` so that exp vectorises (the kernels keep to finite values). Where there is
no compiler, or the build fails, `load()` says why once and returns None, and the
callers keep their torch path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_SOURCES = [
    Path(__file__).with_name(name)
    for name in ("paged_attention.cpp", "layer_ops.cpp", "quant_linear.cpp", "lora.cpp")
]
# SANSLLM_CPU_ISA builds the kernels (and makes the runtime-dispatched ones choose) as on another
# CPU: "avx2" as on one with AVX2, FMA and F16C but no AVX-512 (x86-64-v3), "plain" with x86-64's
# baseline only. Why: users' CPUs differ from the one at hand, and each path must be measured and
# tested where a better one exists too. Each target builds into its own folder (the flags are hashed).
TARGETS = {"native": "-march=native", "avx2": "-march=x86-64-v3", "plain": "-march=x86-64"}


def _target_from_environment() -> str:
    value = os.environ.get("SANSLLM_CPU_ISA", "").strip().lower() or "native"
    if value not in TARGETS:
        raise ValueError(f"SANSLLM_CPU_ISA must be one of {tuple(TARGETS)}, got {value!r}")
    return value


_TARGET = _target_from_environment()
_CFLAGS = ("-O3", TARGETS[_TARGET], "-fopenmp", "-ffast-math")
_LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops": the loaded op namespace, or "error": why there is none


# read once: `load()` runs on every kernel call of every layer, and reading the environment there
# measured ~1.5 ms of a 52 ms decode step
_enabled = os.environ.get("SANSLLM_CPU_KERNELS", "1").strip().lower() not in {"0", "false", "no", "off"}


def load() -> Any | None:
    """`torch.ops.sansllm_cpu` once the kernels are built (building them on the first call); else None."""
    if not _enabled:
        return None
    ops = _state.get("ops")
    if ops is not None or "error" in _state:
        return ops
    with _lock:
        if "ops" not in _state and "error" not in _state:
            try:
                _build()
                _state["ops"] = torch.ops.sansllm_cpu
            except Exception as error:  # no compiler, no ninja, a failed build: keep the torch path
                _state["error"] = f"{type(error).__name__}: {error}"
                logger.warning("CPU kernels unavailable, using the torch path: %s", _state["error"])
    return _state.get("ops")


def target() -> str:
    """The CPU the kernels are built for: "native" (this one), or the "avx2" / "plain" stand-ins."""
    return _TARGET


def unavailable_reason() -> str | None:
    """Why `load()` gave None (after it was called), for logs and tests."""
    if not _enabled:
        return "disabled by SANSLLM_CPU_KERNELS"
    return _state.get("error")


def build_directory() -> Path:
    """Where the kernels are built and cached: under torch's extension cache, per Python and torch, and
    per version of the sources and flags.

    Why per version of the sources: torch rebuilds an extension whose sources changed, so two
    installs with different kernel sources on one machine (two checkouts, or an upgrade beside an
    old venv) sharing one folder rebuilt each other at every start (35-80 s each, seen while
    measuring cold starts). Hashing the sources costs well under a millisecond.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return Path(root) / version / f"sansllm_cpu_kernels-{_sources_digest()}"


def _sources_digest() -> str:
    """A short hash of every C++ source and header here and of the build flags."""
    digest = hashlib.sha256(repr((_CFLAGS, _LDFLAGS)).encode())
    for path in sorted(Path(__file__).parent.glob("*.[ch]*")):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _build() -> None:
    from torch.utils import cpp_extension

    try:  # the ninja that pip installed with us, even when the venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / "sansllm.lock"):
        # torch's own lock file is a plain file: a process killed while building (a server stopped
        # during its first start) leaves it behind, and every later build would wait on it forever.
        # Under our lock, which the OS releases when its holder dies, any such file is stale.
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name="sansllm_cpu_kernels",
            sources=[str(source) for source in _SOURCES],
            extra_cflags=list(_CFLAGS),  # copies: torch appends its own flags to these lists
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an OS file lock on `path` (released if this process dies); no lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: fall back to torch's own lock alone
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
