"""The length-checked wire encoding shared by every protocol message."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.errors import MalformedMessageError
from securefed.serialization import Reader, Writer


@pytest.mark.parametrize("prefix", range(9))
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64, np.float32, np.float64])
def test_arrays_round_trip_aligned_whatever_precedes_them(prefix: int, dtype: type) -> None:
    values = (np.arange(7) * 3).astype(dtype)
    w = Writer()
    for _ in range(prefix):
        w.u8(0xAB)
    data = w.array(values).u32(99).getvalue()
    r = Reader(data, what="test")
    assert [r.u8("p") for _ in range(prefix)] == [0xAB] * prefix
    decoded = r.array("values")
    assert r.u32("tail") == 99
    r.finish()
    assert decoded.dtype == np.dtype(dtype) and np.array_equal(decoded, values)
    assert decoded.ctypes.data % 8 == 0  # used in place, so it must be aligned


def test_nonzero_padding_is_refused() -> None:
    data = bytearray(Writer().u8(1).array(np.arange(3, dtype=np.uint32)).getvalue())
    data[1 + 1 + 8] = 1  # first padding byte after the one-byte prefix, dtype code and count
    r = Reader(bytes(data), what="test")
    r.u8("p")
    with pytest.raises(MalformedMessageError, match="padding"):
        r.array("values")


def test_a_hostile_length_prefix_allocates_nothing() -> None:
    data = Writer().u8(1).u64(2**60).getvalue()  # dtype uint32, 2^60 elements, no payload
    with pytest.raises(MalformedMessageError, match="claims|truncated"):
        Reader(data, what="test").array("values")
    padded = data + bytes(7)  # with the padding present, the count itself is refused
    with pytest.raises(MalformedMessageError, match="claims"):
        Reader(padded, what="test").array("values")


def test_trailing_and_truncated_bytes_are_refused() -> None:
    data = Writer().u32(5).blob(b"abc").getvalue()
    r = Reader(data + b"\0", what="test")
    r.u32("n"), r.blob("b")
    with pytest.raises(MalformedMessageError, match="trailing"):
        r.finish()
    short = Reader(data[:-1], what="test")
    short.u32("n")
    with pytest.raises(MalformedMessageError, match="truncated"):
        short.blob("b")
