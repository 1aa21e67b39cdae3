"""Shared random rotations that flatten a vector before it is quantised.

The distributed discrete Gaussian (Kairouz, Liu, Steinke 2021) rounds every coordinate to an
integer and sums modulo 2**b; a vector whose mass sits in a few coordinates would need a large
modulus for those few. Rotating by a random orthogonal matrix first spreads the mass evenly:
after the randomized Hadamard transform U = H D / sqrt(d) (H the d x d Walsh-Hadamard matrix,
D a diagonal of random signs, d a power of two) every coordinate of U x is sub-Gaussian with
variance proxy ||x||^2 / d (Hoeffding over the random signs). This is the rotation of Ailon and
Chazelle (2006), "Approximate nearest neighbors and the fast Johnson-Lindenstrauss transform".

The rotation is for utility, not privacy: the privacy analysis only needs the L2 bound after
rounding, which holds for any rotation, so the signs may come from a seed every site knows
(the round seed). All sites of a round must use the same rotation, or their sum means nothing.

U is orthogonal and H is symmetric with H H = d I, so U^-1 = U^T = D H / sqrt(d). The fast
Walsh-Hadamard transform computes H x in O(d log d) additions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..errors import ConfigError
from ..primitives.randomness import RandomSource, SeededRandom

__all__ = ["Rotation", "RandomRotation", "rotation_kind", "next_power_of_two", "walsh_hadamard"]

# Domain separation: the round seed may feed other derivations; the signs get their own stream.
_SIGNS_LABEL = "securefed/privacy/rotation/hadamard-signs/v1"
# Width of the matrix product that replaces the first butterfly stages.
_BLOCK = 64
# Largest padded dimension: 2**40 float64 values would already be 8 TiB.
_MAX_DIMENSION = 1 << 40


class Rotation(Enum):
    """Which random rotation flattens updates (Hadamard is enough; a DFT variant could follow)."""

    HADAMARD = "hadamard"


def rotation_kind(value: str | Rotation) -> Rotation:
    """Convert ``"hadamard"`` (or a Rotation) into a :class:`Rotation`."""
    if isinstance(value, Rotation):
        return value
    if isinstance(value, str):
        for member in Rotation:
            if member.value == value.lower():
                return member
    raise ConfigError(f"unknown rotation {value!r}; known: {[m.value for m in Rotation]}")


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"dimension must be an int >= 1, got {n!r}")
    return 1 << (int(n) - 1).bit_length()


@functools.cache
def _sylvester(size: int) -> np.ndarray:
    # The symmetric Walsh-Hadamard matrix of a power-of-two size, by Sylvester's doubling.
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    matrix.flags.writeable = False
    return matrix


def walsh_hadamard(x: np.ndarray) -> np.ndarray:
    """Return H x (unnormalised) for a 1-D float vector whose length is a power of two."""
    values = np.array(x, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or values.size & (values.size - 1):
        raise ConfigError(f"walsh_hadamard needs a 1-D vector of power-of-two length, got shape {values.shape}")
    d = values.size
    # H_d = H_(d/B) (x) H_B: one matrix product does the first log2(B) stages, whose butterflies
    # are too narrow for numpy to run quickly one by one.
    block = min(d, _BLOCK)
    values = values.reshape(-1, block) @ _sylvester(block)
    values = values.reshape(-1)
    scratch = np.empty_like(values)
    h = block
    # Stage h combines the pairs (i, i + h) inside blocks of 2h: [a, b] -> [a + b, a - b].
    while h < d:
        pairs = values.reshape(-1, 2, h)
        out = scratch.reshape(-1, 2, h)
        np.add(pairs[:, 0, :], pairs[:, 1, :], out=out[:, 0, :])
        np.subtract(pairs[:, 0, :], pairs[:, 1, :], out=out[:, 1, :])
        values, scratch = scratch, values
        h *= 2
    return values


@dataclass(frozen=True, kw_only=True, eq=False)
class RandomRotation:
    """The rotation U = H D / sqrt(d) for one round; pads inputs of ``dimension`` with zeros to d."""

    kind: Rotation
    dimension: int
    padded_dimension: int
    signs: np.ndarray

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.kind, Rotation):
            problems.append(f"kind must be a Rotation, got {self.kind!r}")
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int) or self.dimension < 1:
            problems.append(f"dimension must be an int >= 1, got {self.dimension!r}")
        elif self.padded_dimension != next_power_of_two(self.dimension):
            problems.append(f"padded_dimension must be {next_power_of_two(self.dimension)}, got {self.padded_dimension!r}")
        signs = np.asarray(self.signs)
        if signs.shape != (self.padded_dimension,) or not np.all(np.abs(signs) == 1):
            problems.append("signs must be a vector of +1/-1 of length padded_dimension")
        if problems:
            raise ConfigError(problems)
        frozen = signs.astype(np.float64)
        frozen.flags.writeable = False
        object.__setattr__(self, "signs", frozen)

    @classmethod
    def from_rng(cls, *, dimension: int, rng: RandomSource, kind: Rotation | str = Rotation.HADAMARD) -> RandomRotation:
        """Draw the signs from ``rng`` (one random bit per padded coordinate)."""
        kind = rotation_kind(kind)
        padded = next_power_of_two(dimension)
        if padded > _MAX_DIMENSION:
            raise ConfigError(f"dimension {dimension} is too large to rotate (limit 2**40)")
        if not isinstance(rng, RandomSource):
            raise ConfigError(f"rng must be a RandomSource, got {type(rng).__name__}")
        bits = np.unpackbits(np.frombuffer(rng.random_bytes((padded + 7) // 8), dtype=np.uint8))[:padded]
        signs = 1.0 - 2.0 * bits.astype(np.float64)
        return cls(kind=kind, dimension=int(dimension), padded_dimension=padded, signs=signs)

    @classmethod
    def for_round(cls, *, dimension: int, round_seed: bytes, kind: Rotation | str = Rotation.HADAMARD) -> RandomRotation:
        """The rotation every site of the round derives from the shared ``round_seed``."""
        if not isinstance(round_seed, bytes | bytearray) or len(round_seed) == 0:
            raise ConfigError("round_seed must be non-empty bytes shared by every site of the round")
        stream = SeededRandom(bytes(round_seed)).fork(_SIGNS_LABEL)
        return cls.from_rng(dimension=dimension, rng=stream, kind=kind)

    def _check_length(self, x: np.ndarray, length: int, what: str) -> np.ndarray:
        values = np.asarray(x, dtype=np.float64)
        if values.shape != (length,):
            raise ConfigError(f"{what} must be a 1-D vector of length {length}, got shape {values.shape}")
        return values

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """Return U x for ``x`` of length ``dimension`` (or already padded); length ``padded_dimension``."""
        values = np.asarray(x, dtype=np.float64)
        if values.shape == (self.dimension,) and self.dimension != self.padded_dimension:
            padded = np.zeros(self.padded_dimension)
            padded[: self.dimension] = values
            values = padded
        values = self._check_length(values, self.padded_dimension, "the vector to rotate")
        rotated = walsh_hadamard(values * self.signs)
        rotated *= 1.0 / np.sqrt(self.padded_dimension)
        return rotated

    def invert(self, y: np.ndarray) -> np.ndarray:
        """Return U^-1 y = D H y / sqrt(d), of length ``padded_dimension``."""
        values = self._check_length(y, self.padded_dimension, "the vector to un-rotate")
        restored = walsh_hadamard(values)
        restored *= self.signs
        restored *= 1.0 / np.sqrt(self.padded_dimension)
        return restored

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        """Invert the rotation and drop the padding: length ``dimension``."""
        return self.invert(y)[: self.dimension].copy()
