"""The mask PRG: AES-256-CTR keystream read as little-endian unsigned integers.

A 32-byte seed is used directly as the AES-256 key (all 256 bits, nothing hashed or folded)
and the 128-bit big-endian counter block starts at zero, so the mask for a seed is

    AES_k(0) || AES_k(1) || AES_k(2) || ...

read as little-endian uint32 or uint64 words. Arithmetic on masks is modulo 2**32 or 2**64,
which numpy's unsigned integers provide for free by wrapping around.

Performance: the keystream is written straight into the caller's array by
``update_into``, one bounded chunk at a time, from one shared read-only zero buffer, so no
full-size temporary is ever made.
"""

from __future__ import annotations

import functools
import sys
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from securefed.errors import ConfigError, CryptoError

__all__ = ["SEED_SIZE", "COUNTER_SIZE", "MASK_DTYPES", "expand_into", "expand", "MaskAccumulator"]

SEED_SIZE = 32
COUNTER_SIZE = 16
MASK_DTYPES: tuple[type[np.unsignedinteger], ...] = (np.uint32, np.uint64)

# 1 MiB chunks: large enough that per-call overhead vanishes, small enough to stay in cache
# when the accumulator adds each chunk right after generating it (measured: 256 and 512 KiB
# were slower per mask, 2 MiB within noise of 1 MiB).
_CHUNK_BYTES = 1 << 20
_ZERO_COUNTER = bytes(COUNTER_SIZE)
_BIG_ENDIAN_HOST = sys.byteorder == "big"


@functools.cache
def _zeros() -> memoryview:
    # Built on first use rather than at import; it is read-only, so sharing it is safe.
    return memoryview(bytes(_CHUNK_BYTES))


def _check_seed(seed: bytes) -> bytes:
    if not isinstance(seed, bytes | bytearray | memoryview):
        raise CryptoError(f"mask seed must be bytes, got {type(seed).__name__}")
    if len(seed) != SEED_SIZE:
        raise CryptoError(
            f"mask seed must be exactly {SEED_SIZE} bytes, got {len(seed)}; "
            "derive it with hkdf_sha256(..., length=32)"
        )
    return bytes(seed)


def _encryptor(seed: bytes, initial_counter: bytes | None) -> CipherContext:
    key = _check_seed(seed)
    if initial_counter is None:
        counter = _ZERO_COUNTER
    elif (
        not isinstance(initial_counter, bytes | bytearray | memoryview)
        or len(initial_counter) != COUNTER_SIZE
    ):
        raise CryptoError(f"initial_counter must be {COUNTER_SIZE} bytes")
    else:
        counter = bytes(initial_counter)
    return Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()


def _check_mask_array(out: np.ndarray, what: str) -> None:
    if not isinstance(out, np.ndarray):
        raise ConfigError(f"{what} must be a numpy array, got {type(out).__name__}")
    if out.dtype.type not in MASK_DTYPES or not out.dtype.isnative:
        raise ConfigError(
            f"{what} must have dtype uint32 or uint64 (native byte order), got {out.dtype}"
        )
    if not out.flags.c_contiguous:
        raise ConfigError(
            f"{what} must be C-contiguous; pass a fresh array or np.ascontiguousarray(...)"
        )
    if not out.flags.writeable:
        raise ConfigError(f"{what} must be writeable")


def _write_keystream(encryptor: CipherContext, dest: memoryview) -> None:
    """Write the next ``len(dest)`` keystream bytes into ``dest``, one chunk at a time."""
    zeros = _zeros()
    total = len(dest)
    for start in range(0, total, _CHUNK_BYTES):
        stop = min(start + _CHUNK_BYTES, total)
        # CTR is a stream mode, so the output is exactly as long as the input.
        encryptor.update_into(zeros[: stop - start], dest[start:stop])


def _to_little_endian_words(array: np.ndarray) -> None:
    # The keystream is defined as little-endian words; only big-endian hosts must swap.
    if _BIG_ENDIAN_HOST:
        array.byteswap(inplace=True)


def expand_into(
    seed: bytes, out: np.ndarray, *, initial_counter: bytes | None = None
) -> np.ndarray:
    """Fill ``out`` (contiguous uint32/uint64) with the mask keystream for ``seed``; return it.

    ``initial_counter`` replaces the all-zero starting counter block. It exists for checking
    the cipher path against published AES-CTR vectors; masks always use the default.
    """
    _check_mask_array(out, "out")
    encryptor = _encryptor(seed, initial_counter)
    _write_keystream(encryptor, memoryview(out).cast("B"))
    _to_little_endian_words(out)
    return out


def expand(seed: bytes, length: int, dtype: type[np.unsignedinteger] = np.uint32) -> np.ndarray:
    """Return a new array of ``length`` mask words (uint32 or uint64) for ``seed``."""
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 0:
        raise ConfigError(f"length must be a non-negative int, got {length!r}")
    if np.dtype(dtype).type not in MASK_DTYPES:
        raise ConfigError(f"dtype must be np.uint32 or np.uint64, got {np.dtype(dtype)}")
    return expand_into(seed, np.empty(int(length), dtype=dtype))


class MaskAccumulator:
    """A running sum of masks modulo 2**bits, in O(length) memory.

    Holds one accumulator of ``length`` words plus one chunk-sized scratch buffer; every
    :meth:`add` or :meth:`subtract` generates the seed's keystream chunk by chunk into the
    scratch and folds it into the accumulator in place, while the chunk is still in cache.
    """

    __slots__ = ("_values", "_scratch", "_scratch_bytes")

    def __init__(self, length: int, dtype: type[np.unsignedinteger] = np.uint32) -> None:
        if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 0:
            raise ConfigError(f"length must be a non-negative int, got {length!r}")
        if np.dtype(dtype).type not in MASK_DTYPES:
            raise ConfigError(f"dtype must be np.uint32 or np.uint64, got {np.dtype(dtype)}")
        self._values = np.zeros(int(length), dtype=dtype)
        itemsize = self._values.itemsize
        scratch_words = min(int(length), _CHUNK_BYTES // itemsize)
        self._scratch = np.empty(scratch_words, dtype=dtype)
        self._scratch_bytes = memoryview(self._scratch).cast("B")

    @property
    def values(self) -> np.ndarray:
        """The accumulator itself (not a copy): the sum of everything added so far."""
        return self._values

    @property
    def dtype(self) -> np.dtype:
        """The word type, uint32 or uint64."""
        return self._values.dtype

    def __len__(self) -> int:
        return self._values.size

    def _fold(self, seed: bytes, ufunc: np.ufunc) -> None:
        update_into = _encryptor(seed, None).update_into
        values = self._values
        scratch = self._scratch
        scratch_bytes = self._scratch_bytes
        zeros = _zeros()
        step = scratch.size
        total = values.size
        if len(zeros) < len(scratch_bytes):
            # Only if the chunk size changed after this accumulator was made.
            zeros = memoryview(bytes(len(scratch_bytes)))
        whole = total - total % step if step else 0
        if whole:
            # Whole chunks as rows of one view, with every buffer sliced once: the per-chunk
            # Python work is just the two calls.
            zeros_chunk = zeros[: len(scratch_bytes)]
            for target in values[:whole].reshape(-1, step):
                update_into(zeros_chunk, scratch_bytes)
                if _BIG_ENDIAN_HOST:
                    scratch.byteswap(inplace=True)
                ufunc(target, scratch, out=target)
        if whole < total:
            count = total - whole
            size = count * values.itemsize
            update_into(zeros[:size], scratch_bytes[:size])
            words = scratch[:count]
            _to_little_endian_words(words)
            target = values[whole:]
            ufunc(target, words, out=target)

    def add(self, seed: bytes) -> None:
        """Add the mask expanded from ``seed`` (mod 2**bits)."""
        self._fold(seed, np.add)

    def subtract(self, seed: bytes) -> None:
        """Subtract the mask expanded from ``seed`` (mod 2**bits)."""
        self._fold(seed, np.subtract)

    def add_array(self, values: np.ndarray) -> None:
        """Add ``values`` (same length and dtype as the accumulator) in place (mod 2**bits)."""
        if not isinstance(values, np.ndarray):
            raise ConfigError(f"values must be a numpy array, got {type(values).__name__}")
        if values.shape != self._values.shape:
            raise ConfigError(
                f"values has shape {values.shape}, the accumulator has {self._values.shape}; "
                "pass a flat array of the same length"
            )
        if values.dtype != self._values.dtype:
            raise ConfigError(
                f"values has dtype {values.dtype}, the accumulator has {self._values.dtype}; "
                "encode with a codec of the same bit width"
            )
        np.add(self._values, values, out=self._values)

    def __repr__(self) -> str:
        return f"MaskAccumulator(length={self._values.size}, dtype={self._values.dtype.name})"
