"""The reference for the quantized linear kernels: GGUF blocks dequantized with the `gguf` package
(the same code as `GGUFReader` users run), then a float32 matmul."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def dequantize(qweight: torch.Tensor, qtype: int, out_features: int, in_features: int) -> torch.Tensor:
    """GGUF blocks (uint8, `out_features` rows of `in_features` elements) -> float32 [out_features, in_features]."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    blocks = qweight.detach().cpu().contiguous().numpy().reshape(out_features, -1)
    values = gguf_dequantize(blocks, GGMLQuantizationType(int(qtype)))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(out_features, in_features)


def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int, out_features: int, in_features: int
) -> torch.Tensor:
    """x [..., in_features] @ dequant(qweight).T -> [..., out_features], in x's dtype."""
    weight = dequantize(qweight, qtype, out_features, in_features).to(x.device)
    return F.linear(x.float(), weight).to(x.dtype)
