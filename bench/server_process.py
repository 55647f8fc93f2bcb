"""Our server in a subprocess (`sansllm serve`) for the serving benchmark, ready when /health says so."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

HEALTH_POLL_INTERVAL_S = 0.5


class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


REPO_ROOT = Path(__file__).resolve().parent.parent


def server_environment() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH.

    The editable install can resolve the project's packages as namespace packages when the
    console script runs from outside the repository (sys.path[0] is then .venv/bin); the server
    must import this checkout's real packages.
    """
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def sansllm_command() -> list[str]:
    """The `sansllm` console script of this interpreter's environment, or the same entry point via -c."""
    script = Path(sys.executable).with_name("sansllm")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from sansllm.cli import main; sys.exit(main())"]


class ManagedServer:
    """A server subprocess with its output in a log file (shown if it fails to start): started and
    polled until `GET /health` answers 200, stopped by `stop_signal` (then killed if it lingers)."""

    label = "server"
    stop_signal = signal.SIGINT  # graceful shutdown, as Ctrl-C
    default_ready_timeout_s = 600.0

    def __init__(self, command: Sequence[str], port: int, env: dict[str, str] | None = None) -> None:
        self.command = list(command)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self._env = env
        self._log = tempfile.NamedTemporaryFile("w+", prefix=f"{self.label}-", suffix=".log", delete=False)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float | None = None) -> None:
        timeout = self.default_ready_timeout_s if ready_timeout_s is None else ready_timeout_s
        self._process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self._env, cwd=REPO_ROOT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerFailed(f"{self.label} exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(HEALTH_POLL_INTERVAL_S)  # polling a subprocess: there is nothing to wait on
        self.stop()
        raise ServerFailed(f"{self.label} not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """The server's process id once started (for profilers such as py-spy)."""
        return self._process.pid if self._process is not None else None

    def log_tail(self, max_chars: int = 4000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-max_chars:]

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(self.stop_signal)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()
        os.unlink(self._log.name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServerProcess(ManagedServer):
    """`sansllm serve MODEL --port P ...`."""

    label = "sansllm-bench"

    def __init__(self, model: str, args: Sequence[str] = (), port: int | None = None) -> None:
        port = port or free_port()
        command = [*sansllm_command(), "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
        super().__init__(command, port, env=server_environment())
