"""The C++ kernels compile for every CPU they dispatch for, not only the one at hand: each source is
compiled (code generated, so a SIMD intrinsic outside its target fails) under each stand-in target's
flags (`kernels.cpu_ops.TARGETS`), which turn off the AVX-512 (and, for "plain", the AVX2) code that
`-march=native` builds here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils import cpp_extension

from kernels import cpu_ops


def _command(march: str, source: str) -> list[str]:
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    return ["g++", "-std=c++17", march, "-fopenmp", "-c", "-O0", "-o", os.devnull, "-w", *includes, source]


def _compile(job: tuple[str, str]) -> tuple[str, str, subprocess.CompletedProcess[str]]:
    target, source = job
    command = _command(cpu_ops.TARGETS[target], source)
    return target, source, subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("g++") is None or sys.platform != "linux", reason="needs g++ on Linux")
def test_every_source_compiles_for_every_stand_in_target():
    jobs = [(t, str(s)) for t in sorted(set(cpu_ops.TARGETS) - {"native"}) for s in cpu_ops._SOURCES]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # header parsing dominates: use every core
        results = list(pool.map(_compile, jobs))
    failures = [f"{os.path.basename(s)} for {t}:\n{r.stderr[-2000:]}" for t, s, r in results if r.returncode]
    assert not failures, "\n".join(failures)
    assert len(results) == 2 * len(cpu_ops._SOURCES)
