"""Pooled vectors as binary, for responses: `encoding_format` "base64" and "bytes".

vLLM's `tensor2binary`: the values cast to `embed_dtype` (float32, float16 or bfloat16), flattened
row-major, in the byte order `endianness` names ("native" is this machine's). base64 of float32
in native order on a little-endian machine is what the `openai` client decodes with
`numpy.frombuffer(base64.b64decode(s), dtype="float32")` (and it asks for base64 by default).
Pure Python (`struct`), so the protocol core needs no numpy or torch.
"""

from __future__ import annotations

import base64
import math
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import Literal

EmbedDType = Literal["float32", "float16", "bfloat16"]
Endianness = Literal["native", "big", "little"]

_ORDER = {"little": "<", "big": ">"}


def _order(endianness: Endianness) -> str:
    return _ORDER[sys.byteorder if endianness == "native" else endianness]


def flatten(data: Sequence[float] | Sequence[Sequence[float]]) -> list[float]:
    """A vector, or one row per token, as one row-major list of floats."""
    values: list[float] = []
    for item in data:
        if isinstance(item, int | float):
            values.append(float(item))
        else:
            values.extend(float(value) for value in item)
    return values


def shape_of(data: Sequence[float] | Sequence[Sequence[float]]) -> list[int]:
    """[n] for a vector, [rows, n] for per-token rows (as torch's `.shape`, for the bytes metadata)."""
    if data and not isinstance(data[0], int | float):
        rows = list(data)
        return [len(rows), len(rows[0])]  # type: ignore[arg-type]
    return [len(data)]


def to_bytes(
    values: Iterable[float], embed_dtype: EmbedDType = "float32", endianness: Endianness = "native"
) -> bytes:
    """The values cast to `embed_dtype` (round to nearest even; overflow gives +-inf, as a cast does)."""
    order = _order(endianness)
    if embed_dtype in ("float32", "float16"):
        code = "f" if embed_dtype == "float32" else "e"
        values = list(values)
        try:
            return struct.pack(f"{order}{len(values)}{code}", *values)
        except OverflowError:
            return b"".join(_pack(order + code, value) for value in values)
    if embed_dtype == "bfloat16":
        return b"".join(struct.pack(order + "H", _bfloat16_bits(value)) for value in values)
    raise ValueError(f"unknown embed_dtype {embed_dtype!r}")


def to_base64(
    values: Iterable[float], embed_dtype: EmbedDType = "float32", endianness: Endianness = "native"
) -> str:
    return base64.b64encode(to_bytes(values, embed_dtype, endianness)).decode("ascii")


def _pack(fmt: str, value: float) -> bytes:
    try:
        return struct.pack(fmt, value)
    except OverflowError:  # past the format's largest finite value: a cast gives infinity
        return struct.pack(fmt, math.copysign(math.inf, value))


def _bfloat16_bits(value: float) -> int:
    """The float32 value's upper 16 bits, rounded to nearest even (torch's float -> bfloat16)."""
    (bits,) = struct.unpack("<I", _pack("<f", value))
    if math.isnan(value):
        return (bits >> 16) | 0x0040  # a quiet NaN
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
