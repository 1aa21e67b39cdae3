"""Fixed-point quantisation of real vectors into Z_(2**b), b in {32, 64}.

A value x becomes round(clip(x) * scale) with unbiased stochastic rounding, stored modulo
2**b in two's complement. Sums of encodings stay exact modulo 2**b, so the sum of n
encodings decodes to the sum of the n rounded values, provided that sum fits the signed
range; :meth:`FixedPointCodec.check_capacity` guarantees it does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from securefed.errors import ConfigError
from securefed.primitives.randomness import (
    RandomSource,
    _consume_words,
    _fill_words,
    _to_unit_floats,
)

__all__ = ["FixedPointCodec"]

_DTYPES: dict[int, type[np.unsignedinteger]] = {32: np.uint32, 64: np.uint64}
_SIGNED: dict[int, type[np.signedinteger]] = {32: np.int32, 64: np.int64}
# Elements per block of the encoder: few enough that its scratch arrays stay cached and no
# temporary has the input's length, enough that per-block call overhead stays small
# (measured fastest between 2**12 and 2**18).
_BLOCK = 1 << 16
# Inputs whose values float64 holds exactly, so finiteness can be checked before converting.
_EXACT_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


def _positive_finite(name: str, value: object, problems: list[str]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        problems.append(f"{name} must be a number, got {type(value).__name__}")
    elif not math.isfinite(value) or value <= 0:
        problems.append(f"{name} must be finite and > 0, got {value!r}")


@dataclass(frozen=True)
class FixedPointCodec:
    """Encode float arrays as ``bit_width``-bit integers: ``q = round(clip(x) * scale)``.

    ``scale`` and ``clip`` are keyword-only so they cannot be swapped by accident.
    """

    bit_width: int = 32
    scale: float = field(kw_only=True)
    clip: float = field(kw_only=True)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.bit_width, bool) or self.bit_width not in _DTYPES:
            problems.append(f"bit_width must be 32 or 64, got {self.bit_width!r}")
        _positive_finite("scale", self.scale, problems)
        _positive_finite("clip", self.clip, problems)
        if not problems:
            object.__setattr__(self, "scale", float(self.scale))
            object.__setattr__(self, "clip", float(self.clip))
            limit = 2 ** (self.bit_width - 1) - 1
            if self.max_magnitude() > limit:
                problems.append(
                    f"clip * scale = {self.clip * self.scale:g} does not fit one signed "
                    f"{self.bit_width}-bit value (limit {limit}); lower clip or scale"
                )
        if problems:
            raise ConfigError(problems)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The unsigned integer type of encodings: np.uint32 or np.uint64."""
        return _DTYPES[self.bit_width]

    @property
    def modulus(self) -> int:
        """2**bit_width: encodings and their sums live modulo this."""
        return 1 << self.bit_width

    def max_magnitude(self) -> int:
        """The largest absolute integer a single encoded value can have, ceil(clip * scale)."""
        return math.ceil(self.clip * self.scale)

    def error_bound(self) -> float:
        """Maximum absolute error of one encode/decode of an unclipped value: 1 / scale."""
        return 1.0 / self.scale

    def check_capacity(self, n_terms: int) -> None:
        """Raise :class:`ConfigError` if a sum of ``n_terms`` encodings could overflow."""
        if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 1:
            raise ConfigError(f"n_terms must be a positive int, got {n_terms!r}")
        limit = 2 ** (self.bit_width - 1) - 1
        worst = n_terms * self.max_magnitude()
        if worst > limit:
            try:
                safe = type(self).max_safe_scale(
                    clip=self.clip, n_terms=n_terms, bit_width=self.bit_width
                )
                advice = f"lower scale to at most {safe:g}, lower clip"
            except ConfigError:
                advice = "lower clip"
            raise ConfigError(
                f"summing {n_terms} sites' values clipped to +/-{self.clip:g} at scale "
                f"{self.scale:g} can reach {worst}, beyond the signed {self.bit_width}-bit "
                f"limit {limit}: {advice}, reduce the number of sites per sum"
                + (", or use bit_width=64" if self.bit_width == 32 else "")
            )

    @classmethod
    def max_safe_scale(cls, *, clip: float, n_terms: int, bit_width: int = 32) -> float:
        """Return the largest power-of-two scale for which ``check_capacity(n_terms)`` passes."""
        problems: list[str] = []
        _positive_finite("clip", clip, problems)
        if isinstance(bit_width, bool) or bit_width not in _DTYPES:
            problems.append(f"bit_width must be 32 or 64, got {bit_width!r}")
        if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 1:
            problems.append(f"n_terms must be a positive int, got {n_terms!r}")
        if problems:
            raise ConfigError(problems)
        limit = 2 ** (bit_width - 1) - 1
        if n_terms > limit:
            raise ConfigError(
                f"{n_terms} terms cannot be summed in {bit_width} bits at any scale "
                f"(limit {limit}); use bit_width=64 or fewer terms"
            )
        clip = float(clip)

        def fits(exponent: int) -> bool:
            # Multiplying by a power of two is exact, so ceil sees the true product.
            return n_terms * math.ceil(math.ldexp(clip, exponent)) <= limit

        # Start near the answer, then step to the exact edge; 1023 keeps 2**exponent a float.
        exponent = min(math.floor(math.log2(limit) - math.log2(n_terms) - math.log2(clip)), 1023)
        while not fits(exponent):
            exponent -= 1
        while exponent < 1023 and fits(exponent + 1):
            exponent += 1
        return math.ldexp(1.0, exponent)

    def _check_values(self, values: np.ndarray) -> np.ndarray:
        """Validate ``values``; returns an array whose float64 conversion is the input's.

        float16/32/64 and integer arrays are returned as they are (converted block by block
        later, which gives the same float64 values), other float types converted first.
        """
        array = np.asarray(values)
        if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
            raise ConfigError(f"values must be a real numeric array, got dtype {array.dtype}")
        if array.dtype.kind == "f" and array.dtype not in _EXACT_FLOATS:
            array = array.astype(np.float64)
        if array.dtype.kind == "f" and not _all_finite(array):
            bad = np.flatnonzero(~np.isfinite(array).ravel())
            raise ConfigError(
                f"values contain {bad.size} NaN or infinite entries (first at flat index "
                f"{int(bad[0])}); fix or drop them before encoding"
            )
        return array

    def encode(self, values: np.ndarray, rng: RandomSource) -> np.ndarray:
        """Clip, scale, stochastically round and wrap ``values``; returns ``codec.dtype``.

        The rounding uniforms are ``uniform_floats(rng, values.size)``, in C order.
        """
        array = self._check_values(values)
        flat = array.ravel()
        out = np.empty(flat.size, dtype=self.dtype)
        block = _Block(self, flat, out)
        if flat.size <= _BLOCK:
            block.encode(0, _to_unit_floats(_fill_words(rng, np.empty(flat.size, np.uint64))))
        else:
            # Large inputs: the random words are generated block by block into one scratch
            # array and used while still in cache; nothing of the input's length is made.
            _consume_words(rng, flat.size, _BLOCK, block.encode_words)
        return out.reshape(array.shape)

    def encode_with_uniforms(self, values: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Like :meth:`encode` but with the rounding randomness given explicitly.

        ``uniforms`` must have the shape of ``values`` with entries in [0, 1). Value v is
        rounded up exactly when ``u < v - floor(v)`` (after clipping and scaling), which has
        the same distribution as ``floor(v + u)`` but stays exact for large v. Meant for
        known-answer tests; real encodings should use :meth:`encode`.
        """
        array = self._check_values(values)
        uniforms = np.asarray(uniforms, dtype=np.float64)
        if uniforms.shape != array.shape:
            raise ConfigError(f"uniforms has shape {uniforms.shape}, values has {array.shape}")
        if uniforms.size and not (uniforms.min() >= 0.0 and uniforms.max() < 1.0):
            raise ConfigError("uniforms must lie in [0, 1)")
        return self._encode_checked(array, uniforms)

    def _encode_checked(self, array: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        flat_uniforms = uniforms.ravel()
        flat = array.ravel()
        out = np.empty(flat.size, dtype=self.dtype)
        block = _Block(self, flat, out)
        for start in range(0, flat.size, _BLOCK):
            block.encode(start, flat_uniforms[start : start + _BLOCK])
        return out.reshape(array.shape)

    def decode(self, q: np.ndarray) -> np.ndarray:
        """Interpret ``q`` (one encoding or a sum of several) as signed and divide by scale."""
        array = np.asarray(q)
        if array.dtype.kind not in "iu":
            raise ConfigError(f"q must be an integer array, got dtype {array.dtype}")
        if array.dtype != self.dtype:
            # Integer casts wrap modulo 2**b, which is exactly the ring encodings live in.
            array = array.astype(self.dtype)
        signed = array.view(_SIGNED[self.bit_width])
        return signed.astype(np.float64) / self.scale


def _all_finite(array: np.ndarray) -> bool:
    if array.size <= _BLOCK:
        return bool(np.isfinite(array).all())
    # min and max propagate NaN and reach any infinity, without a full-size boolean temporary.
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))


class _Block:
    """Encodes ``values`` into ``out`` one block at a time, reusing block-sized scratch.

    Per block: v = clip(x) * scale, r = floor(v), and q = r + (u < v - r), written straight
    into ``out`` as a signed integer (every |q| is at most max_magnitude, which fits, so the
    cast is exact and the unsigned view wraps modulo 2**bit_width).
    """

    __slots__ = ("_values", "_signed", "_scale", "_clip", "_scaled", "_floor", "_up")

    def __init__(self, codec: FixedPointCodec, values: np.ndarray, out: np.ndarray) -> None:
        size = min(values.size, _BLOCK)
        self._values = values
        self._signed = out.view(_SIGNED[codec.bit_width])
        # float64 scalars make clip convert any input type to float64 as it reads it.
        self._scale = np.float64(codec.scale)
        self._clip = np.float64(codec.clip)
        self._scaled = np.empty(size, dtype=np.float64)
        self._floor = np.empty(size, dtype=np.float64)
        self._up = np.empty(size, dtype=np.bool_)

    def encode_words(self, words: np.ndarray, start: int) -> None:
        """Encode the block at ``start`` with uniforms made from raw words (reused in place)."""
        self.encode(start, _to_unit_floats(words))

    def encode(self, start: int, uniforms: np.ndarray) -> None:
        """Encode values ``start`` to ``start + uniforms.size`` with those uniforms."""
        count = uniforms.size
        stop = start + count
        scaled = self._scaled[:count]
        floor = self._floor[:count]
        up = self._up[:count]
        np.clip(self._values[start:stop], -self._clip, self._clip, out=scaled)
        np.multiply(scaled, self._scale, out=scaled)
        np.floor(scaled, out=floor)
        # scaled now holds the fractional part in [0, 1); round up with that probability.
        np.subtract(scaled, floor, out=scaled)
        np.less(uniforms, scaled, out=up)
        np.add(floor, up, out=self._signed[start:stop], casting="unsafe")
