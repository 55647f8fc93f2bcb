"""llama.cpp's `llama-server`, built from source, as a peer backend of the serving benchmark.

    .venv/bin/python -m bench.llama_server build [native|avx2 ...]   # build (cached), print the binary

A benchmark-only dependency: never imported by the server or by `make test`'s code paths. The
source is the `llama-cpp-python` sdist from PyPI (it vendors llama.cpp), fetched with pip at a
pinned version into `~/.cache/sansllm/llama.cpp/` ($SANSLLM_LLAMA_CPP_CACHE), and only the
`llama-server` target is built, once per variant:

- `native`: GGML_NATIVE=ON (-march=native; every instruction this CPU has, AVX-512 included);
- `avx2`: GGML_NATIVE=OFF with AVX/AVX2/FMA/F16C/BMI2 on and every AVX-512 and AMX option off, to
  compare on the AVX2 path of an AVX-512 machine.

Each build lives in a folder keyed by the version, the variant and a hash of its cmake flags (for
`native`, of this CPU's flags too), so a second run reuses it and a change of flags rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.server_process import ManagedServer, free_port

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # pinned: its vendored llama.cpp is what the results describe
VARIANTS = ("native", "avx2")
BINARY_NAME = "llama-server"

# Only what llama-server needs: no tests, examples or extra tools; no HTTPS (the benchmark talks
# to localhost) and no web UI download (the build must work offline once the sdist is cached).
# Static libraries, so the cached binary does not depend on a build tree's shared objects.
COMMON_FLAGS: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",  # LLAMA_CURL's successor (LLAMA_CURL is deprecated in this version)
    "GGML_BACKEND_DL": "OFF",
    "GGML_CPU_ALL_VARIANTS": "OFF",
}

AVX512_OFF = (
    "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
    "GGML_AVX_VNNI", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16",
)  # fmt: skip
AVX2_ON = ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2")

VARIANT_FLAGS: dict[str, dict[str, str]] = {
    "native": {"GGML_NATIVE": "ON"},
    "avx2": {"GGML_NATIVE": "OFF", **dict.fromkeys(AVX2_ON, "ON"), **dict.fromkeys(AVX512_OFF, "OFF")},
}

INSTALL_HINT = (
    "building llama-server needs cmake (>= 3.14) and a C++17 compiler: "
    "`.venv/bin/pip install cmake` (or `apt-get install cmake`) and `apt-get install g++`"
)


class BuildFailed(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[llama.cpp] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """$SANSLLM_LLAMA_CPP_CACHE, else ~/.cache/sansllm/llama.cpp: outside the repository, kept across runs."""
    configured = os.environ.get("SANSLLM_LLAMA_CPP_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "sansllm" / "llama.cpp"


def cmake_flags(variant: str) -> dict[str, str]:
    """Every -D flag of a variant's configure step."""
    if variant not in VARIANT_FLAGS:
        raise ValueError(f"unknown llama.cpp build variant {variant!r}; one of {VARIANTS}")
    return {**COMMON_FLAGS, **VARIANT_FLAGS[variant]}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This CPU's model name and flags: a -march=native binary is only valid on a CPU with these."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(wanted))  # the first CPU's lines; every core repeats them


def build_key(variant: str, version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    """The build folder's name: version, variant and a hash of what the binary depends on."""
    flags = cmake_flags(variant)
    material = "\n".join([version, *(f"{k}={v}" for k, v in sorted(flags.items()))])
    if flags.get("GGML_NATIVE") == "ON":
        material += "\n" + cpu_flags()
    digest = hashlib.sha256(material.encode()).hexdigest()[:10]
    return f"build-{version}-{variant}-{digest}"


def find_cmake() -> str:
    """cmake on PATH or in this interpreter's environment (`pip install cmake` puts it there)."""
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if not found:
        raise BuildFailed(f"cmake not found. {INSTALL_HINT}")
    return found


def check_compiler() -> None:
    """Fail early, with what to install, rather than deep inside cmake's output."""
    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        raise BuildFailed(f"no C++ compiler found (c++, g++ or clang++). {INSTALL_HINT}")


def configure_command(cmake: str, source: Path, build: Path, variant: str) -> list[str]:
    """cmake's configure step; Ninja when available (faster no-op rebuilds, one progress line a step)."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    defines = [f"-D{key}={value}" for key, value in cmake_flags(variant).items()]
    return [cmake, "-S", str(source), "-B", str(build), *generator, *defines]


def build_command(cmake: str, build: Path, jobs: int | None = None) -> list[str]:
    return [
        cmake,
        "--build",
        str(build),
        "--target",
        BINARY_NAME,
        "--parallel",
        str(jobs or os.cpu_count() or 1),
    ]


def fetch_sdist(root: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The llama-cpp-python source archive, downloaded once with pip (no wheel: it must be the sdist)."""
    folder = root / "sdist"
    existing = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
    if existing:
        return existing[0]
    folder.mkdir(parents=True, exist_ok=True)
    log(f"downloading the llama-cpp-python {version} sdist into {folder}")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"llama-cpp-python=={version}", "--dest", str(folder),
    ]  # fmt: skip
    if subprocess.run(command, stdout=sys.stderr).returncode != 0:
        raise BuildFailed(f"`{' '.join(command)}` failed: is PyPI reachable?")
    existing = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not existing:
        raise BuildFailed(f"pip saved no llama_cpp_python-{version}.tar.gz in {folder}")
    return existing[0]


def unpack_sources(root: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The vendored llama.cpp source tree, unpacked once (into a temporary folder, then renamed)."""
    target = root / f"src-{version}"
    source = target / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    archive = fetch_sdist(root, version)
    log(f"unpacking {archive.name}")
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    with tarfile.open(archive) as tar:
        tar.extractall(scratch, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    if not (source / "CMakeLists.txt").is_file():
        raise BuildFailed(f"{archive} holds no vendor/llama.cpp/CMakeLists.txt")
    return source


def binary_path(variant: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / build_key(variant) / "bin" / BINARY_NAME


def build(variant: str, root: Path | None = None, jobs: int | None = None) -> Path:
    """The `llama-server` binary of `variant`, built unless a finished build is cached."""
    root = root or cache_root()
    binary = binary_path(variant, root)
    stamp = binary.parent.parent / "BUILT"
    if binary.is_file() and stamp.is_file():
        return binary
    cmake = find_cmake()
    check_compiler()
    source = unpack_sources(root)
    folder = binary.parent.parent
    started = time.monotonic()
    log(f"building {BINARY_NAME} ({variant}) in {folder}; several minutes on a few cores")
    for step in (configure_command(cmake, source, folder, variant), build_command(cmake, folder, jobs)):
        log(" ".join(step))
        if subprocess.run(step, stdout=sys.stderr).returncode != 0:
            raise BuildFailed(f"`{' '.join(step)}` failed (output above). {INSTALL_HINT}")
    if not binary.is_file():
        raise BuildFailed(f"the build finished but {binary} is missing")
    stamp.write_text(" ".join(f"-D{k}={v}" for k, v in cmake_flags(variant).items()) + "\n")
    log(f"built {binary} in {time.monotonic() - started:.0f}s")
    return binary


def context_per_slot(longest_prompt: int, longest_output: int, margin: int = 64) -> int:
    """Tokens one slot must hold: the longest prompt and output, a margin for special tokens, rounded up."""
    needed = longest_prompt + longest_output + margin
    return -(-needed // 256) * 256


def server_command(
    binary: Path | str,
    model: str,
    port: int,
    parallel: int,
    ctx_per_slot: int,
    threads: int | None = None,
    alias: str | None = None,
) -> list[str]:
    """llama-server with `parallel` slots, each holding `ctx_per_slot` tokens (-c is split across slots)."""
    threads = threads or os.cpu_count() or 1
    command = [
        str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(port),
        "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
        "-t", str(threads), "-tb", str(threads), "--no-webui",
    ]  # fmt: skip
    if alias:
        command += ["-a", alias]
    return command


class LlamaServer(ManagedServer):
    """A running `llama-server`, its output in a log file (shown if it fails to start)."""

    label = "llama-server"
    stop_signal = signal.SIGTERM  # llama-server shuts down cleanly on it
    default_ready_timeout_s = 300.0  # /health answers 503 while the model loads

    @classmethod
    def for_model(
        cls, binary: Path, model: str, parallel: int, ctx_per_slot: int, alias: str | None = None
    ) -> LlamaServer:
        port = free_port()
        return cls(server_command(binary, model, port, parallel, ctx_per_slot, alias=alias), port)


def parse_variants(value: str) -> tuple[str, ...]:
    """'none' -> (); 'native' or 'native,avx2' -> the variants, checked (argparse shows the error)."""
    if value.strip().lower() in ("", "none"):
        return ()
    variants = tuple(dict.fromkeys(part.strip() for part in value.split(",")))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown llama-server variant(s) {unknown}; use none or {','.join(VARIANTS)}"
        )
    return variants


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build (or find cached) llama-server binaries")
    build_parser.add_argument(
        "variants", nargs="*", type=parse_variants, default=[("native",)], help="native, avx2 or native,avx2"
    )
    build_parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: CPUs)")
    args = parser.parse_args(argv)
    try:
        for variant in dict.fromkeys(v for group in args.variants for v in group):
            print(build(variant, jobs=args.jobs))
    except BuildFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
