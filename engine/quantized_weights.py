"""GGUF weights kept in their quantized blocks: the tensors the loader hands over, and the modules'
storage for them.

Why keep them: decode at small batches is bound by reading the weights, and a Q4 block is a
seventh of float32's bytes; and a 7B Q4_K_M file (about 4 GB) dequantized to float32 would need
28 GB. The matmuls run on the blocks as they are (`kernels.quant_linear`); token embeddings
dequantize only the rows a step looks up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from kernels.torch_ops.quantized import dequantize

# GGML type ids kept quantized: what common GGUF files hold and the kernels run
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
KEPT_QUANTIZED = frozenset({Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K})
_BLOCK_ELEMENTS = {Q4_0: 32, Q4_1: 32, Q5_0: 32, Q5_1: 32, Q8_0: 32, Q4_K: 256, Q5_K: 256, Q6_K: 256}


@dataclass(frozen=True)
class QuantizedTensor:
    """A GGUF matrix as stored: `data` uint8 [rows, bytes per row]; `rows` x `cols` elements of `qtype`."""

    data: torch.Tensor
    qtype: int
    rows: int
    cols: int

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.data.to(device), self.qtype, self.rows, self.cols)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols] (exactness checks, and formats a kernel lacks)."""
        return dequantize(self.data, self.qtype, self.rows, self.cols)


def can_keep(qtype: int, cols: int) -> bool:
    """Whether a GGUF tensor of this type and row length stays quantized (else it is dequantized)."""
    return qtype in KEPT_QUANTIZED and cols % _BLOCK_ELEMENTS[qtype] == 0


def stack_rows(parts: list[QuantizedTensor]) -> list[QuantizedTensor]:
    """Join consecutive parts of one type into one matrix (rows are independent in every format), so
    that a stacked projection (q/k/v, gate/up) is one kernel call where the file allows it."""
    merged: list[QuantizedTensor] = []
    for part in parts:
        last = merged[-1] if merged else None
        if last is not None and last.qtype == part.qtype and last.cols == part.cols:
            data = torch.cat([last.data, part.data])
            merged[-1] = QuantizedTensor(data, part.qtype, last.rows + part.rows, part.cols)
        else:
            merged.append(part)
    return merged


class QuantizedMatrix(nn.Module):
    """A linear layer's weight as one or more row ranges of quantized blocks (several when a stacked
    projection's parts differ in type, as Q4_K_M files store attn_v in Q6_K beside Q4_K q and k)."""

    def __init__(self, parts: list[QuantizedTensor]):
        super().__init__()
        self.parts = stack_rows(parts)
        for i, part in enumerate(self.parts):  # buffers, so `.to()` and memory accounting see them
            self.register_buffer(f"blocks_{i}", part.data, persistent=False)
        self.out_features = sum(part.rows for part in self.parts)
        self.in_features = self.parts[0].cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [
            kernels.quant_linear(x, part.data, part.qtype, part.rows, part.cols) for part in self.parts
        ]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Keep `parts` pointing at the buffers after `.to(device)` (whose dtype it must not change)."""
        super()._apply(fn, recurse)
        self.parts = [
            QuantizedTensor(getattr(self, f"blocks_{i}"), p.qtype, p.rows, p.cols)
            for i, p in enumerate(self.parts)
        ]
        return self

    def extra_repr(self) -> str:
        types = ",".join(str(part.qtype) for part in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, qtypes={types}"


class QuantizedEmbedding(nn.Module):
    """A token embedding kept quantized: a lookup dequantizes only the rows it gathers."""

    def __init__(self, table: QuantizedTensor, dtype: torch.dtype):
        super().__init__()
        self.table = table
        self.register_buffer("blocks", table.data, persistent=False)
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = table.rows, table.cols

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        values = dequantize(rows, self.table.qtype, rows.shape[0], self.embedding_dim)
        return values.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self.table = QuantizedTensor(self.blocks, self.table.qtype, self.table.rows, self.table.cols)
        return self
