"""The architecture of DESIGN.md, checked: import contracts, and a core tested without IO."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_protocol_tests_run_without_sockets_threads_or_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYPOTHESIS_NO_PLUGINS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.no_io_guard",
         "-p", "no:timeout", "-p", "no:anyio", "tests/protocol"],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout


def test_protocol_imports_no_heavy_libraries():
    code = (
        "import sys, protocol.app, protocol.calls, protocol.requests, protocol.chat_template;"
        "bad=[m for m in sys.modules if m.split('.')[0] in"
        " ('torch','transformers','tokenizers','asyncio','trio','threading_','engine','kernels')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
