"""The reference for the quantized linear kernels: GGUF blocks dequantized with torch tensor ops, then a
float32 matmul (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; F16, BF16 and F32 as they are).

Pure torch (no numpy, no `gguf`), so it runs where the weights are, CUDA included, and serves as the
fallback for every format a faster kernel lacks. Byte layouts are llama.cpp's (ggml-common.h), as the
`gguf` package's `gguf/quants.py` reads them; `tests/kernels/test_quant_reference.py` checks this module
against that package bit for bit. Every step is vectorised over all blocks at once; the arithmetic is
done in the same float32 order as the package's, so results agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# GGML type ids
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30

# qtype -> (elements per block, bytes per block)
BLOCK_SIZES: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}

# names for error messages (kernels/ may not import the `gguf` package that has the full enum)
_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
    25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}  # fmt: skip


def type_name(qtype: int) -> str:
    """`Q4_K (12)`-style label for messages."""
    return f"{_TYPE_NAMES.get(int(qtype), 'unknown type')} ({int(qtype)})"


def _fp16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 at byte `offset` of every block, as float32 [n_blocks, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 2k]: the low nibbles of all bytes first, then the high nibbles."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _shifts(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """18 bytes: scale d (f16), 16 bytes of 4-bit q; x = d * (q - 8)."""
    q = _nibbles(blocks[:, 2:18]).float() - 8.0
    return _fp16(blocks, 0) * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """20 bytes: scale d, minimum m (f16), 16 bytes of 4-bit q; x = d * q + m."""
    return _fp16(blocks, 0) * _nibbles(blocks[:, 4:20]).float() + _fp16(blocks, 2)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 4 bytes (a little-endian uint32) -> [n_blocks, 32]: bit i is element i's fifth bit."""
    return ((qh[:, :, None] >> _shifts(list(range(8)), qh.device)) & 0x01).reshape(-1, 32)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """22 bytes: scale d (f16), 4 bytes of fifth bits, 16 bytes of nibbles; x = d * (q - 16)."""
    q = _nibbles(blocks[:, 6:22]) | (_fifth_bits(blocks[:, 2:6]) << 4)
    return _fp16(blocks, 0) * (q.float() - 16.0)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """24 bytes: scale d, minimum m (f16), 4 bytes of fifth bits, 16 bytes of nibbles; x = d * q + m."""
    q = _nibbles(blocks[:, 8:24]) | (_fifth_bits(blocks[:, 4:8]) << 4)
    return _fp16(blocks, 0) * q.float() + _fp16(blocks, 2)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """34 bytes: scale d (f16), 32 int8 q; x = q * d."""
    return blocks[:, 2:34].view(torch.int8).float() * _fp16(blocks, 0)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 6-bit (scale, min) for the 8 sub-blocks, each float32 [n_blocks, 8].

    Sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scale) and 4-7 (min); sub-blocks 4-7
    take the low/high nibble of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7."""
    low, mid, top = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    scale = torch.cat([low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    minimum = torch.cat([mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return scale.float(), minimum.float()


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> [n_blocks, 8, 32]: sub-block 2i is the low nibbles of bytes 32i.., 2i+1 the high."""
    return _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """144 bytes: d, dmin (f16), 12 bytes of sub-block scales/mins, 128 bytes of 4-bit q (8 x 32)."""
    scale, minimum = _k_scales(blocks[:, 4:16])
    dl = (_fp16(blocks, 0) * scale).unsqueeze(-1)
    ml = (_fp16(blocks, 2) * minimum).unsqueeze(-1)
    return (dl * _k_low_nibbles(blocks[:, 16:144]).float() - ml).reshape(-1, 256)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """176 bytes: Q4_K's header, 32 bytes of fifth bits (bit i of byte j: sub-block i, element j), 128
    bytes of low nibbles."""
    scale, minimum = _k_scales(blocks[:, 4:16])
    dl = (_fp16(blocks, 0) * scale).unsqueeze(-1)
    ml = (_fp16(blocks, 2) * minimum).unsqueeze(-1)
    high = (blocks[:, None, 16:48] >> _shifts(list(range(8)), blocks.device)[:, None]) & 0x01
    q = _k_low_nibbles(blocks[:, 48:176]) | (high << 4)
    return (dl * q.float() - ml).reshape(-1, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """210 bytes: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16), d (f16).

    Each half of 128 elements: low nibbles from its 64 bytes (low then high nibble), high bits from
    its 32 bytes (bit pairs 0-1, 2-3, 4-5, 6-7 for its four runs of 32); x = d * scale * (q - 32)."""
    low = _nibbles(blocks[:, 0:128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> _shifts([0, 2, 4, 6], blocks.device)[:, None]
    q = (low | ((qh & 0x03).reshape(-1, 8, 32) << 4)).float() - 32.0
    dl = (_fp16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    return (dl * q.reshape(-1, 16, 16)).reshape(-1, 256)


_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    Q4_0: _q4_0,
    Q4_1: _q4_1,
    Q5_0: _q5_0,
    Q5_1: _q5_1,
    Q8_0: _q8_0,
    Q4_K: _q4_k,
    Q5_K: _q5_k,
    Q6_K: _q6_k,
}
_FLOAT_TYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}


def block_shape(qtype: int, in_features: int) -> tuple[int, int]:
    """(elements, bytes) per block of `qtype`, checking that a row of `in_features` is whole blocks."""
    qtype = int(qtype)
    if qtype not in BLOCK_SIZES:
        raise ValueError(f"quantized weights of GGML type {type_name(qtype)} are not supported")
    elements, nbytes = BLOCK_SIZES[qtype]
    if in_features % elements:
        raise ValueError(f"{type_name(qtype)} rows are blocks of {elements}; got in_features={in_features}")
    return elements, nbytes


def _as_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """The raw data as uint8 (GGUFReader hands F16/F32 tensors over typed)."""
    flat = qweight.detach().contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def dequantize(qweight: torch.Tensor, qtype: int, out_features: int, in_features: int) -> torch.Tensor:
    """GGUF blocks (uint8, `out_features` rows of `in_features` elements) -> float32 [out_features, in_features],
    on `qweight`'s device."""
    qtype = int(qtype)
    elements, nbytes = block_shape(qtype, in_features)
    raw = _as_bytes(qweight)
    expected = out_features * (in_features // elements) * nbytes
    if raw.numel() != expected:
        raise ValueError(
            f"{type_name(qtype)} weight of {out_features}x{in_features} needs {expected} bytes, got {raw.numel()}"
        )
    if qtype in _FLOAT_TYPES:
        return raw.view(_FLOAT_TYPES[qtype]).float().reshape(out_features, in_features)
    values = _DEQUANTIZERS[qtype](raw.reshape(-1, nbytes))
    return values.reshape(out_features, in_features)


def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int, out_features: int, in_features: int
) -> torch.Tensor:
    """x [..., in_features] @ dequant(qweight).T -> [..., out_features], in x's dtype."""
    weight = dequantize(qweight.to(x.device), qtype, out_features, in_features)
    return F.linear(x.float(), weight).to(x.dtype)
