"""Settings for `tl.dot` shared by the kernels that use it."""

from __future__ import annotations

import torch
from triton import knobs


def dot_precision(dtype: torch.dtype) -> str:
    """float32 operands get an exact (ieee) dot, as the torch path does; tf32 would cost ~3 digits."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether to feed tl.dot float32 copies of the operands.

    Only under triton 3.9's interpreter with bfloat16: it stores bfloat16 as uint16 and its dot multiplies
    those integers. Upcasting is exact (bf16 products fit in float32), so interpreter runs still check the
    kernel; compiled kernels keep the bfloat16 tensor-core dot.
    """
    return dtype == torch.bfloat16 and bool(knobs.runtime.interpret)
