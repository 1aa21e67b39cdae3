"""Sources of random bytes, and the samplers built on them.

Everything in securefed that needs randomness takes a :class:`RandomSource`, so a whole
simulated federation can be replayed from one seed (:class:`SeededRandom`) while real
deployments use the operating system (:class:`SystemRandom`).
"""

from __future__ import annotations

import hashlib
import os
import threading
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
        with self._lock:
            return self._encryptor.update(bytes(n))

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


def uniform_floats(rng: RandomSource, n: int) -> np.ndarray:
    """Return ``n`` float64 values uniform in [0, 1), each built from 53 random bits."""
    n = _check_count(n, "n")
    words = np.frombuffer(rng.random_bytes(8 * n), dtype="<u8")
    # The top 53 bits of each word fill a float64 mantissa exactly.
    return (words >> np.uint64(11)).astype(np.float64) * (2.0**-53)


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
        words = np.frombuffer(rng.random_bytes(8 * draw), dtype="<u8") & mask
        accepted = words[words < limit][:missing]
        result[filled : filled + accepted.size] = accepted
        filled += accepted.size
    return result
