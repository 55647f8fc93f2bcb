"""pytest plugin: fail any test that opens a socket, starts a thread, or imports torch/model libraries.

Loaded (with `-p tests.no_io_guard`) by `tests/test_layering.py` around the protocol core's own
tests, so "the Sans-IO core is tested without sockets, threads or torch" is checked, not assumed.
"""

from __future__ import annotations

import importlib.abc
import socket
import sys
import threading

FORBIDDEN_MODULES = ("torch", "transformers", "tokenizers", "triton", "engine", "kernels", "trio", "hypercorn")


class _Forbid(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in FORBIDDEN_MODULES:
            raise ImportError(f"the protocol core's tests must not import {fullname}")
        return None


def _no_socket(*args, **kwargs):
    raise RuntimeError("the protocol core's tests must not open sockets")


def _no_thread(self, *args, **kwargs):
    raise RuntimeError("the protocol core's tests must not start threads")


def pytest_configure(config):
    for name in list(sys.modules):
        if name.split(".")[0] in FORBIDDEN_MODULES:
            raise RuntimeError(f"{name} was imported before the guard was installed")
    sys.meta_path.insert(0, _Forbid())
    socket.socket.__init__ = _no_socket  # type: ignore[method-assign]
    threading.Thread.start = _no_thread  # type: ignore[method-assign]
