"""Keep glibc from handing step-sized buffers back to the kernel after every step.

A decode step allocates and frees the same few multi-megabyte tensors each time (logits, sampling
noise, masks: 32 rows x 49152 floats is 6 MiB). glibc's malloc serves blocks that size with mmap,
raises its thresholds when they are freed, and then trims the top of the heap back to the kernel,
so every step faults its buffers' pages in again: measured on a 2-core EPYC, a sampled step of 32
rows took 18.6-23.8 ms against 10.9-11.5 ms with fixed thresholds (`python -m bench.sampler_step`).
Fixing both thresholds (what `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` do) keeps those
pages: blocks under 32 MiB come from the heap, and up to 1 GiB of free heap top stays mapped.
Blocks larger than that (weights, the KV cache) still get their own mappings.

Not done where the user set any `MALLOC_*_` variable (theirs win), nor outside glibc (no mallopt).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024

_tuned: bool | None = None


def keep_step_buffers() -> bool:
    """Set the thresholds once per process; True when they are set (now or before)."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in os.environ
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if _tuned:
        logger.debug("malloc: mmap threshold 32 MiB, trim threshold 1 GiB (engine.allocator)")
    return _tuned
