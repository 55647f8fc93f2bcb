"""Pooled vectors as bytes: float32 / float16 / bfloat16 in either byte order, checked against numpy."""

import base64
import math
import sys

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.vector_bytes import flatten, shape_of, to_base64, to_bytes

ORDERS = {"little": "<", "big": ">", "native": "="}


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, width=64), max_size=16),
    dtype=st.sampled_from(["float32", "float16"]),
    endianness=st.sampled_from(["little", "big", "native"]),
)
def test_float32_and_float16_match_a_numpy_cast(values, dtype, endianness):
    with numpy.errstate(over="ignore"):
        expected = (
            numpy.array(values, dtype="float64")
            .astype(dtype)
            .astype(numpy.dtype(dtype).newbyteorder(ORDERS[endianness]))
        )
    assert to_bytes(values, dtype, endianness) == expected.tobytes()


def test_overflow_becomes_infinity_as_a_cast_does():
    decoded = numpy.frombuffer(to_bytes([1e39, -1e39, 70000.0], "float32", "little"), dtype="<f4")
    assert decoded.tolist()[:2] == [math.inf, -math.inf] and decoded[2] == 70000.0
    assert numpy.frombuffer(to_bytes([70000.0, -1e6], "float16", "little"), dtype="<f2").tolist() == [
        math.inf,
        -math.inf,
    ]


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        (1.0, 0x3F80),
        (-2.0, 0xC000),
        (1 / 3, 0x3EAB),  # 0x3EAAAAAB rounds up
        (1.00390625, 0x3F80),  # 0x3F808000: a tie rounds to the even 0x3F80
        (1.01171875, 0x3F82),  # 0x3F818000: a tie rounds to the even 0x3F82
        (math.inf, 0x7F80),
        (3.4e38, 0x7F80),  # rounds past the largest bfloat16
        (0.0, 0x0000),
        (-0.0, 0x8000),
    ],
)
def test_bfloat16_rounds_to_nearest_even(value, bits):
    assert to_bytes([value], "bfloat16", "big") == bits.to_bytes(2, "big")
    assert to_bytes([value], "bfloat16", "little") == bits.to_bytes(2, "little")


def test_bfloat16_nan_stays_nan():
    (bits,) = numpy.frombuffer(to_bytes([math.nan], "bfloat16", "little"), dtype="<u2")
    assert bits & 0x7F80 == 0x7F80 and bits & 0x007F


def test_native_is_this_machines_order():
    assert to_bytes([1.5], "float32", "native") == to_bytes([1.5], "float32", sys.byteorder)


def test_base64_and_shapes():
    assert numpy.frombuffer(base64.b64decode(to_base64([0.5, 2.0])), dtype="float32").tolist() == [0.5, 2.0]
    assert flatten(((1.0, 2.0), (3.0, 4.0))) == [1.0, 2.0, 3.0, 4.0] and flatten((1.0, 2)) == [1.0, 2.0]
    assert shape_of(((1.0, 2.0), (3.0, 4.0), (5.0, 6.0))) == [3, 2] and shape_of((1.0, 2.0)) == [2]
    with pytest.raises(ValueError):
        to_bytes([1.0], "float64")  # type: ignore[arg-type]
