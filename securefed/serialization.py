"""Length-checked binary encoding for protocol messages: no pickle, no code execution.

A message is a fixed header (magic, format version, message kind) followed by fields written in a
fixed order. Every length is checked against the bytes actually present before anything is
allocated, so a hostile length prefix cannot make a reader allocate gigabytes, and every failure
is a :class:`~securefed.errors.MalformedMessageError` that says what was wrong.
"""

from __future__ import annotations

import struct
import sys

import numpy as np

from securefed.errors import MalformedMessageError

__all__ = ["Writer", "Reader", "DEFAULT_MAX_MESSAGE_BYTES"]

DEFAULT_MAX_MESSAGE_BYTES = 1 << 31

_DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<u4"),
    2: np.dtype("<u8"),
    3: np.dtype("<f4"),
    4: np.dtype("<f8"),
}
_CODE_OF_DTYPE = {dt: code for code, dt in _DTYPE_CODES.items()}


class Writer:
    """Accumulates fields; ``getvalue()`` returns the encoded bytes."""

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []
        self._size = 0

    def _put(self, part: bytes | memoryview) -> None:
        self._parts.append(part)
        self._size += len(part) if isinstance(part, bytes) else part.nbytes

    def u8(self, value: int) -> Writer:
        self._put(struct.pack("<B", value))
        return self

    def u32(self, value: int) -> Writer:
        self._put(struct.pack("<I", value))
        return self

    def u64(self, value: int) -> Writer:
        self._put(struct.pack("<Q", value))
        return self

    def f64(self, value: float) -> Writer:
        self._put(struct.pack("<d", value))
        return self

    def fixed(self, data: bytes, size: int) -> Writer:
        if len(data) != size:
            raise ValueError(f"field must be {size} bytes, got {len(data)}")
        self._put(bytes(data))
        return self

    def blob(self, data: bytes) -> Writer:
        self.u32(len(data))
        self._put(bytes(data))
        return self


    def u32_list(self, values: tuple[int, ...] | list[int]) -> Writer:
        self.u32(len(values))
        self._put(np.asarray(values, dtype="<u4").tobytes())
        return self

    def array(self, values: np.ndarray) -> Writer:
        dtype = values.dtype.newbyteorder("<") if values.dtype.byteorder == ">" else values.dtype
        code = _CODE_OF_DTYPE.get(np.dtype(dtype).newbyteorder("<"))
        if code is None:
            raise ValueError(f"cannot encode arrays of dtype {values.dtype}")
        self.u8(code)
        self.u64(values.size)
        # Zero padding so the elements start 8-byte aligned in the message: a reader can then
        # use them in place instead of copying a multi-megabyte upload.
        self._put(bytes(-self._size % 8))
        flat = np.ascontiguousarray(values.reshape(-1), dtype=_DTYPE_CODES[code])
        self._put(memoryview(flat).cast("B"))
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads fields written by :class:`Writer`, refusing anything truncated or trailing."""

    def __init__(self, data: bytes | bytearray | memoryview, *, what: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessageError(f"{what}: expected bytes, got {type(data).__name__}")
        self._data = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        self._pos = 0
        self._what = what
        # Arrays may be read in place only from memory nobody can change: bytes, or a read-only
        # view of bytes (an inner message read out of an outer one with blob_view).
        self._immutable = isinstance(data, bytes) or (
            isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytes))

    def _take(self, size: int, field: str) -> memoryview:
        end = self._pos + size
        if size < 0 or end > len(self._data):
            raise MalformedMessageError(
                f"{self._what}: truncated while reading {field} "
                f"(needs {size} bytes at offset {self._pos}, message has {len(self._data)})"
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def u8(self, field: str) -> int:
        return int(self._take(1, field)[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack("<I", self._take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack("<Q", self._take(8, field))[0])

    def f64(self, field: str) -> float:
        return float(struct.unpack("<d", self._take(8, field))[0])

    def fixed(self, size: int, field: str) -> bytes:
        return bytes(self._take(size, field))

    def blob(self, field: str, *, max_size: int | None = None) -> bytes:
        size = self.u32(f"length of {field}")
        if max_size is not None and size > max_size:
            raise MalformedMessageError(
                f"{self._what}: {field} is {size} bytes, more than the limit of {max_size}"
            )
        return bytes(self._take(size, field))

    def header(self, magic: bytes, version: int, *, kind: str) -> None:
        """Read and check a message's magic bytes and format version (``kind`` names it in errors)."""
        if self.fixed(len(magic), "magic") != magic:
            raise MalformedMessageError(f"not a securefed {kind} (bad magic bytes)")
        found = self.u8("version")
        if found != version:
            raise MalformedMessageError(f"{kind} version {found} is not supported (expected {version})")

    def blob_view(self, field: str, *, max_size: int | None = None) -> memoryview:
        """Like :meth:`blob`, but a read-only view into the message instead of a copy."""
        size = self.u32(f"length of {field}")
        if max_size is not None and size > max_size:
            raise MalformedMessageError(
                f"{self._what}: {field} is {size} bytes, more than the limit of {max_size}"
            )
        return self._take(size, field).toreadonly()

    def count(self, field: str, *, item_size: int, max_count: int | None = None) -> int:
        """Read a u32 element count and check the items can fit in what is left."""
        n = self.u32(f"count of {field}")
        if max_count is not None and n > max_count:
            raise MalformedMessageError(
                f"{self._what}: {field} has {n} entries, more than the limit of {max_count}"
            )
        if n * item_size > self.remaining():
            raise MalformedMessageError(
                f"{self._what}: {field} claims {n} entries but only {self.remaining()} bytes remain"
            )
        return n

    def u32_list(self, field: str, *, max_count: int | None = None) -> tuple[int, ...]:
        n = self.count(field, item_size=4, max_count=max_count)
        raw = self._take(4 * n, field)
        return tuple(np.frombuffer(raw, dtype="<u4").tolist())

    def array(self, field: str, *, max_elements: int | None = None) -> np.ndarray:
        code = self.u8(f"dtype of {field}")
        dtype = _DTYPE_CODES.get(code)
        if dtype is None:
            raise MalformedMessageError(f"{self._what}: {field} has unknown dtype code {code}")
        n = self.u64(f"length of {field}")
        if max_elements is not None and n > max_elements:
            raise MalformedMessageError(
                f"{self._what}: {field} has {n} elements, more than the limit of {max_elements}"
            )
        if any(self._take(-self._pos % 8, f"padding of {field}")):
            raise MalformedMessageError(f"{self._what}: {field} has non-zero padding")
        if n * dtype.itemsize > self.remaining():
            raise MalformedMessageError(
                f"{self._what}: {field} claims {n} elements but only {self.remaining()} bytes remain"
            )
        raw = self._take(n * dtype.itemsize, field)
        if self._immutable and sys.byteorder == "little":
            # A read-only view of the (immutable) message bytes: no copy of the payload.
            return np.frombuffer(raw, dtype=dtype)
        # Otherwise copy, so the array owns native-order memory independent of the buffer.
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)

    def finish(self) -> None:
        if self.remaining():
            raise MalformedMessageError(
                f"{self._what}: {self.remaining()} unexpected trailing bytes"
            )
