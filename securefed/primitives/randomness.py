"""Sources of random bytes, and the samplers built on them.

Everything in securefed that needs randomness takes a :class:`RandomSource`, so a whole
simulated federation can be replayed from one seed (:class:`SeededRandom`) while real
deployments use the operating system (:class:`SystemRandom`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securefed.errors import ConfigError

__all__ = [
    "RandomSource",
    "SystemRandom",
    "SeededRandom",
    "default_random",
    "uniform_floats",
    "uniform_below",
]

_SEED_TAG = b"securefed/SeededRandom/seed/v1\x00"
_FORK_TAG = b"securefed/SeededRandom/fork/v1\x00"
_ZERO_COUNTER = bytes(16)
# Largest bound uniform_below accepts: keeps the rejection mask inside 63 bits.
_MAX_BOUND = 2**63
# Bytes per update_into call when filling word arrays: large enough that per-call overhead is
# negligible, small enough that the shared zero input stays in cache.
_FILL_CHUNK = 1 << 18
_SMALL_REQUEST = 1 << 12
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_WORD_SHIFT = np.uint64(11)

# (words, start) -> None: receives consecutive blocks of a word stream (see _consume_words).
_WordSink = Callable[[np.ndarray, int], None]


@functools.cache
def _zeros() -> memoryview:
    # Read-only and shared by every stream: CTR output for zero input is the keystream itself.
    return memoryview(bytes(_FILL_CHUNK))


def _word_bytes(out: np.ndarray) -> memoryview:
    """Check that ``out`` can take words in place and return its bytes."""
    if not isinstance(out, np.ndarray):
        raise ConfigError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.dtype(np.uint64):
        raise ConfigError(f"out must have dtype uint64 (native byte order), got {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ConfigError("out must be a C-contiguous, writeable array")
    # A zero-size array cannot be cast, and has no bytes to fill anyway.
    return memoryview(out).cast("B") if out.size else memoryview(bytearray())


def _words_from_little_endian(words: np.ndarray) -> np.ndarray:
    # Random bytes are read as little-endian words; only big-endian hosts must swap.
    if _BIG_ENDIAN_HOST:
        words.byteswap(inplace=True)
    return words


@runtime_checkable
class RandomSource(Protocol):
    """Anything that can hand out uniformly random bytes."""

    def random_bytes(self, n: int) -> bytes:
        """Return ``n`` uniformly random bytes."""
        ...


def _check_count(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise ConfigError(f"{what} must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 0:
        raise ConfigError(f"{what} must be >= 0, got {n}")
    return n


class SystemRandom:
    """Random bytes from the operating system's CSPRNG (``os.urandom``)."""

    __slots__ = ()

    def random_bytes(self, n: int) -> bytes:
        """Return ``n`` bytes from ``os.urandom``."""
        return os.urandom(_check_count(n, "n"))

    def fill_uniform_words(self, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (C-contiguous, writeable uint64) with random words and return it.

        The words are ``os.urandom`` bytes read as little-endian uint64, as
        :func:`uniform_floats` and :func:`uniform_below` would read :meth:`random_bytes`.
        """
        dest = _word_bytes(out)
        for start in range(0, len(dest), _FILL_CHUNK):
            stop = min(start + _FILL_CHUNK, len(dest))
            dest[start:stop] = os.urandom(stop - start)
        return _words_from_little_endian(out)

    def _consume_words(self, n: int, block: int, sink: _WordSink) -> None:
        scratch = np.empty(min(n, block), dtype=np.uint64)
        for start in range(0, n, block):
            words = scratch[: min(block, n - start)]
            sink(self.fill_uniform_words(words), start)

    def __repr__(self) -> str:
        return "SystemRandom()"


def _encode_seed(seed: int | bytes | str) -> bytes:
    # A type prefix keeps seed=1, seed=b"1" and seed="1" from colliding.
    if isinstance(seed, bool):
        raise ConfigError("seed must be an int, bytes or str, not a bool")
    if isinstance(seed, int):
        return b"int\x00" + str(seed).encode("ascii")
    if isinstance(seed, bytes | bytearray | memoryview):
        return b"bytes\x00" + bytes(seed)
    if isinstance(seed, str):
        return b"str\x00" + seed.encode("utf-8")
    raise ConfigError(f"seed must be an int, bytes or str, got {type(seed).__name__}")


class SeededRandom:
    """Deterministic CSPRNG for reproducible simulations.

    The key is SHA-256 over a domain-separation tag and the encoded seed; the output is the
    AES-256-CTR keystream under that key with a zero initial counter block. Two instances made
    from the same seed produce the same bytes. Never use a guessable seed for real secrets.
    """

    __slots__ = ("_key", "_encryptor", "_lock")

    def __init__(self, seed: int | bytes | str) -> None:
        self._init_from_key(hashlib.sha256(_SEED_TAG + _encode_seed(seed)).digest())

    def _init_from_key(self, key: bytes) -> None:
        self._key = key
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
        # The keystream position is shared state; keep concurrent callers from interleaving.
        self._lock = threading.Lock()

    @classmethod
    def _from_key(cls, key: bytes) -> SeededRandom:
        instance = cls.__new__(cls)
        instance._init_from_key(key)
        return instance

    def random_bytes(self, n: int) -> bytes:
        """Return the next ``n`` bytes of the keystream."""
        n = _check_count(n, "n")
        # Mid-sized requests encrypt the shared zero buffer instead of allocating (and faulting
        # in) a fresh one; tiny ones are cheaper with a fresh small object.
        zeros = _zeros()[:n] if _SMALL_REQUEST < n <= _FILL_CHUNK else bytes(n)
        with self._lock:
            return self._encryptor.update(zeros)

    def fill_uniform_words(self, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (C-contiguous, writeable uint64) with keystream words and return it.

        The words are the next ``8 * out.size`` bytes of the stream, exactly the bytes
        ``random_bytes(8 * out.size)`` would return, read as little-endian uint64 (as
        :func:`uniform_floats` and :func:`uniform_below` read them); the stream advances the
        same way. The whole fill is one locked step, like one :meth:`random_bytes` call.
        """
        dest = _word_bytes(out)
        with self._lock:
            self._keystream_into(dest)
        return _words_from_little_endian(out)

    def _consume_words(self, n: int, block: int, sink: _WordSink) -> None:
        scratch = np.empty(min(n, block), dtype=np.uint64)
        raw = _word_bytes(scratch)
        # One lock for all blocks: the n words are one contiguous piece of the stream, exactly
        # as if they had been read with a single fill_uniform_words call.
        with self._lock:
            for start in range(0, n, block):
                count = min(block, n - start)
                self._keystream_into(raw[: 8 * count])
                sink(_words_from_little_endian(scratch[:count]), start)

    def _keystream_into(self, dest: memoryview) -> None:
        # The caller holds the lock. update_into writes straight into dest: no temporaries.
        zeros = _zeros()
        update_into = self._encryptor.update_into
        for start in range(0, len(dest), _FILL_CHUNK):
            stop = min(start + _FILL_CHUNK, len(dest))
            update_into(zeros[: stop - start], dest[start:stop])

    def fork(self, label: str) -> SeededRandom:
        """Return an independent child stream for ``label``.

        The child depends only on this source's seed and the label, not on how much of this
        stream has been read, so each simulated party can fork its own stream in any order.
        Forking twice with the same label returns two copies of the same stream.
        """
        if not isinstance(label, str):
            raise ConfigError(f"fork label must be a str, got {type(label).__name__}")
        child = hashlib.sha256(_FORK_TAG + self._key + label.encode("utf-8")).digest()
        return SeededRandom._from_key(child)

    def __repr__(self) -> str:
        # The key would let anyone replay every secret derived from this stream.
        return "SeededRandom(<seed hidden>)"


def default_random(seed: int | bytes | str | None) -> RandomSource:
    """Return ``SeededRandom(seed)``, or ``SystemRandom()`` when ``seed`` is None."""
    if seed is None:
        return SystemRandom()
    return SeededRandom(seed)


def _fast_source(rng: RandomSource) -> bool:
    """Whether ``rng`` is a SeededRandom or SystemRandom whose word fills match random_bytes.

    A subclass that overrides random_bytes or fill_uniform_words goes through random_bytes,
    so the words always come from the bytes it defines.
    """
    for klass in type(rng).__mro__:
        if klass is SeededRandom or klass is SystemRandom:
            return True
        if "random_bytes" in vars(klass) or "fill_uniform_words" in vars(klass):
            return False
    return False


def _fill_words(rng: RandomSource, out: np.ndarray) -> np.ndarray:
    """Fill the fresh uint64 array ``out`` as ``random_bytes(8 * out.size)`` read as "<u8"."""
    if _fast_source(rng):
        return rng.fill_uniform_words(out)  # type: ignore[attr-defined]
    out[...] = np.frombuffer(rng.random_bytes(8 * out.size), dtype="<u8")
    return out


def _consume_words(rng: RandomSource, n: int, block: int, sink: _WordSink) -> None:
    """Feed the ``n`` words that ``uniform_floats(rng, n)`` would use to ``sink``, in order.

    ``sink(words, start)`` gets words ``start`` to ``start + words.size`` in a reused scratch
    array of at most ``block`` words, which it may overwrite; nothing of length ``n`` is
    allocated. The source's lock is held throughout, so ``sink`` must not use ``rng``.
    """
    if _fast_source(rng):
        rng._consume_words(n, block, sink)  # type: ignore[attr-defined]
        return
    words = np.frombuffer(rng.random_bytes(8 * n), dtype="<u8")
    if words.size != n:
        raise ValueError(f"random_bytes returned {8 * words.size} bytes, not {8 * n}")
    for start in range(0, n, block):
        sink(words[start : start + block].astype(np.uint64), start)


def _to_unit_floats(words: np.ndarray) -> np.ndarray:
    """Turn uint64 words into floats in [0, 1) in place; returns the float64 view."""
    # The top 53 bits of each word fill a float64 mantissa exactly.
    np.right_shift(words, _WORD_SHIFT, out=words)
    floats = words.view(np.float64)
    # After the shift every word fits an int64; assignment converts as if from a copy.
    floats[...] = words.view(np.int64)
    floats *= 2.0**-53
    return floats


def uniform_floats(rng: RandomSource, n: int) -> np.ndarray:
    """Return ``n`` float64 values uniform in [0, 1), each built from 53 random bits.

    Value i comes from bytes ``8i`` to ``8i + 8`` of ``rng.random_bytes(8 * n)``, read as a
    little-endian word whose top 53 bits are scaled by ``2**-53``.
    """
    n = _check_count(n, "n")
    # The words are generated into the output array itself and converted there.
    return _to_unit_floats(_fill_words(rng, np.empty(n, dtype=np.uint64)))


def uniform_below(rng: RandomSource, bound: int, n: int) -> np.ndarray:
    """Return ``n`` uint64 values uniform in [0, bound), by rejection sampling.

    Each draw is masked to the smallest power of two covering ``bound`` and rejected when it
    is ``>= bound``, so acceptance is above one half and the result is exactly uniform.
    """
    n = _check_count(n, "n")
    if isinstance(bound, bool) or not isinstance(bound, int | np.integer):
        raise ConfigError(f"bound must be an int, got {type(bound).__name__}")
    bound = int(bound)
    if not 1 <= bound <= _MAX_BOUND:
        raise ConfigError(f"bound must be in [1, 2**63], got {bound}")
    mask = np.uint64((1 << (bound - 1).bit_length()) - 1)
    limit = np.uint64(bound)
    # Expected draws per accepted value; >= 1 and < 2.
    draws_per_value = (int(mask) + 1) / bound
    result = np.empty(n, dtype=np.uint64)
    filled = 0
    while filled < n:
        missing = n - filled
        # A small surplus makes a second pass rare without wasting much randomness.
        draw = int(missing * draws_per_value * 1.02) + 32
        words = _fill_words(rng, np.empty(draw, dtype=np.uint64))
        np.bitwise_and(words, mask, out=words)
        accepted = words[words < limit][:missing]
        result[filled : filled + accepted.size] = accepted
        filled += accepted.size
    return result
