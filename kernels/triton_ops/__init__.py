"""Triton kernels, one module per kernel, each wrapper with the same signature as its `kernels.torch_ops` twin.

Imported lazily by `kernels.ops` on the first CUDA call, so CPU-only processes never load triton, and tests
can set `TRITON_INTERPRET=1` before these modules are first imported (triton reads it at decoration time).
"""
