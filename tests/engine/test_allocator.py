"""engine.allocator: step-sized buffers stay mapped between steps once the engine tuned malloc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate and free a 6 MiB tensor (a 32 x 49152 float32 step buffer) many times and count the minor
# page faults of the later rounds: pages the kernel had to map again because malloc gave them back.
SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from engine.allocator import keep_step_buffers
    assert keep_step_buffers()
for _ in range(3):
    torch.empty(32, 49152).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(32, 49152).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True
    )
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_step_buffers_are_not_faulted_in_again_each_step():
    pages_per_round = 32 * 49152 * 4 // 4096
    # by default glibc keeps giving some back (measured: 384 of each round's 1536 pages, every round)
    assert faults("default") > 2 * pages_per_round
    assert faults("tuned") < pages_per_round // 10


def test_user_malloc_settings_win(monkeypatch):
    import engine.allocator as allocator

    monkeypatch.setattr(allocator, "_tuned", None)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert allocator.keep_step_buffers() is False
