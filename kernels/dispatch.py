"""Which implementation a kernel call runs: triton on CUDA tensors; on the CPU, the C++ kernels of
`kernels.cpu_ops` where one exists and builds, else the torch path.

The choice is process-wide and can be forced, so tests can run the triton kernels on CPU tensors under
`TRITON_INTERPRET=1` (or only the torch references) through the same public functions the model calls.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton", "cpp"]
_BACKENDS = ("auto", "torch", "triton", "cpp")

_backend: Backend = "auto"


def _initial_backend() -> Backend:
    value = os.environ.get("SANSLLM_KERNELS", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"SANSLLM_KERNELS must be one of {_BACKENDS}, got {value!r}")
    return value  # type: ignore[return-value]


_backend = _initial_backend()


def set_backend(backend: Backend) -> None:
    """Force every kernel onto one implementation ("torch", "triton" or "cpp"), or back to "auto".

    "cpp" uses the C++ CPU kernel where there is one and the torch path for the rest, as "auto" does
    on the CPU."""
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _backend = backend


def get_backend() -> Backend:
    return _backend


@contextlib.contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Run a block with a forced backend, restoring the previous choice afterwards."""
    previous = _backend
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the call on `tensor` should run the triton kernel."""
    if _backend == "auto":
        return tensor.is_cuda
    return _backend == "triton"


def use_cpp(tensor: torch.Tensor) -> bool:
    """True when a call on `tensor` may run a C++ CPU kernel (the caller checks that it built)."""
    if _backend == "auto":
        return tensor.is_cpu  # (4x faster than comparing device.type: every kernel call asks)
    return _backend == "cpp"
