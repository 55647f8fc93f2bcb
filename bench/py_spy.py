"""Where a server's time goes: py-spy samples of `sansllm serve` during a benchmark, summed by part.

`Profiler(pid, path)` runs `py-spy record --format raw --threads --nonblocking` on the server
process for the duration of a `with` block (the server is never paused); `summarize(path, rate)`
reads the collapsed stacks back and puts every sample of every thread in one bucket
(`classify`): the engine thread's model forward by kind of op, its bookkeeping, and the event
loop's HTTP, tokenization, protocol and JSON work. A sample is 1/rate seconds of a thread running
or ready to run (py-spy leaves out threads blocked in a known wait), so on a loaded machine the
figures include time a thread waited for a core.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

DEFAULT_RATE = 200  # samples per second
ATTACH_S = 1.0

# (bucket, patterns), matched against each frame's "function (file" text, innermost frame first; within
# one frame the first bucket that matches wins.
ENGINE_BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("engine: attention (padded grid + SDPA)", ("_SequenceLayout.attend", "_SequenceLayout.__init__")),
    ("engine: projections (linear)", ("linear (kernels/", "(torch/nn/modules/linear.py")),
    ("engine: LayerNorm", ("layer_norm (",)),
    ("engine: embeddings lookup", ("embedding (torch/nn/functional.py",)),
    ("engine: other model ops (GELU, residual adds)", ("EncoderLayer.forward (", "BertModel.forward (")),
    ("engine: pooling + normalize", ("pool (engine/pooling", "embedding_output (engine/pooling")),
    (
        "engine: step inputs and outputs (tensors, tolist, events)",
        ("EncoderCore.step (", "EncoderRunner.run ("),
    ),
    ("engine: waking the event loop", ("_on_engine_step (",)),
    ("engine: decoder step", ("EngineCore.step (",)),
)
LOOP_BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loop: idle (select)", ("EpollSelector.select (", "KqueueSelector.select (")),
    ("loop: tokenization", ("HFTokenizer.encode (", "(engine/tokenizer.py", "(protocol/tokenizer.py")),
    ("loop: access log", ("(hypercorn/logging.py",)),
    ("loop: response body (vectors to JSON)", ("_VectorsReply", "EncodeCall._complete", "(msgspec")),
    ("loop: request parsing, validation, routing", ("App.handle (",)),
    ("loop: engine events to requests", ("_dispatch (", "EventRouter")),
    ("loop: ASGI shell", ("(protocol/asgi.py",)),
    (
        "loop: HTTP and asyncio (hypercorn, h11, sockets, scheduling)",
        ("(hypercorn/", "(h11/", "(asyncio/", "(anyio/"),
    ),
)

_FRAME_LINE = re.compile(r":\d+\)$")


class Profiler:
    """py-spy recording `pid` into `path` (raw collapsed stacks) while the block runs."""

    def __init__(self, pid: int, path: Path, rate: int = DEFAULT_RATE) -> None:
        self.pid, self.path, self.rate = pid, Path(path), rate
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str:
        found = Path(sys.executable).with_name("py-spy")
        if found.is_file():
            return str(found)
        which = shutil.which("py-spy")
        if which is None:
            raise RuntimeError("py-spy is not installed: `.venv/bin/pip install py-spy`")
        return which

    def __enter__(self) -> Profiler:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        command = [self.executable(), "record", "--pid", str(self.pid), "--rate", str(self.rate),
                   "--format", "raw", "--threads", "--nonblocking", "--output", str(self.path)]  # fmt: skip
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(ATTACH_S)  # py-spy takes a moment to attach: let it before the measured work starts
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._process is not None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            _, err = self._process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            _, err = self._process.communicate()
        if not self.path.is_file() and kind is None:
            raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-2000:]}")


def _thread_and_frames(stack: str) -> tuple[str, list[str]]:
    frames = stack.split(";")
    thread = frames[0]
    if thread.startswith("thread ("):  # "thread (0x7f...): name" with --threads
        thread = thread.split(": ", 1)[-1] if ": " in thread else thread
    return thread, [_FRAME_LINE.sub(")", f) for f in frames[1:]]


def classify(thread: str, frames: Sequence[str]) -> str:
    """The bucket of one sample (frames root first): the innermost frame that matches a bucket's
    pattern decides, so time in a callee counts for the callee (a socket write under the ASGI
    shell is HTTP, a tokenizer call under request handling is tokenization)."""
    joined = ";".join(frames)
    is_engine = "EngineThread._loop (" in joined or thread.startswith("sansllm-engine")
    is_loop = not is_engine and ("BaseEventLoop.run_forever (" in joined or thread == "MainThread")
    buckets = ENGINE_BUCKETS if is_engine else LOOP_BUCKETS if is_loop else ()
    for frame in reversed(frames):
        for bucket, patterns in buckets:
            if any(pattern in frame for pattern in patterns):
                return bucket
    if is_engine:
        return "engine: other"
    if is_loop:
        return "loop: other"
    return f"other thread: {thread}"


def summarize(path: Path, rate: int = DEFAULT_RATE) -> dict[str, float]:
    """Seconds per bucket (samples / rate), largest first."""
    seconds: Counter[str] = Counter()
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, frames = _thread_and_frames(stack)
        seconds[classify(thread, frames)] += int(count) / rate
    return dict(seconds.most_common())


def process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process so far (Linux /proc), None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)
