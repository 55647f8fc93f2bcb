"""Kernel tests run every triton kernel on the CPU through triton's interpreter.

Triton decides interpreted vs compiled when a kernel is decorated, i.e. when `kernels.triton_ops.*` is
first imported; `kernels.ops` imports those lazily, so setting the variable here is early enough.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
