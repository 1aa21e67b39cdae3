"""Arithmetic on numpy arrays in GF(p), p = 2**31 - 1: the engine of Shamir sharing.

Field elements are stored as uint64. Every reduced element is below 2**31, so a product of
two fits 64 bits and is reduced right after the multiply; intermediate values a little above
p (below 2**32) are allowed where noted, as their products still fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "PRIME",
    "mul_mod",
    "product",
    "exclusive_products",
    "inverses",
    "lagrange_weights",
    "interpolate",
    "powers",
    "evaluate",
]

PRIME = 2**31 - 1
_P = np.uint64(PRIME)
_SHIFT = np.uint64(31)
_LOW16 = np.uint64(0xFFFF)
_SHIFT16 = np.uint64(16)
# Most polynomial terms one uint64 matrix product may sum (see evaluate).
_MATMUL_TERMS = (1 << 17) - 1
# Below this many entries per step, scans use fewer, larger array operations (see
# exclusive_products); up to this many values are inverted with Python's pow.
_SEQUENTIAL_SCAN_SIZE = 1024
_PYTHON_POW_SIZE = 16


def mul_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * b mod PRIME`` elementwise, for operands below 2**32 (the product fits 64 bits)."""
    result = np.multiply(a, b)
    return np.remainder(result, _P, out=result)


def product(factors: np.ndarray) -> np.ndarray:
    """The product along the first axis (mod PRIME), halving the stack each step."""
    while (count := factors.shape[0]) > 1:
        half = count // 2
        merged = mul_mod(factors[:half], factors[count - half :])
        # With an odd count the middle entry waits for the next round.
        factors = merged if count % 2 == 0 else np.concatenate([merged, factors[half : half + 1]])
    return factors[0] % _P


def exclusive_products(factors: np.ndarray) -> np.ndarray:
    """``out[j]`` = the product of ``factors[i]`` over all ``i != j`` (first axis, mod PRIME)."""
    count = factors.shape[0]
    prefix = np.ones_like(factors)
    suffix = np.ones_like(factors)
    if count > 1 and factors[0].size >= _SEQUENTIAL_SCAN_SIZE:
        # Large slices: one multiply per entry and direction.
        for j in range(1, count):
            prefix[j] = mul_mod(prefix[j - 1], factors[j - 1])
            suffix[count - 1 - j] = mul_mod(suffix[count - j], factors[count - j])
    elif count > 1:
        # Small slices: log2(count) whole-array steps (Hillis-Steele scans) cost fewer calls.
        prefix[1:] = factors[:-1]
        suffix[:-1] = factors[1:]
        shift = 1
        while shift < count:
            prefix[shift:] = mul_mod(prefix[shift:], prefix[:-shift])
            suffix[:-shift] = mul_mod(suffix[:-shift], suffix[shift:])
            shift *= 2
    return mul_mod(prefix, suffix)


def inverses(values: np.ndarray) -> np.ndarray:
    """Modular inverses of a 1-d array of non-zero field elements (Fermat: v**(p-2))."""
    if values.size <= _PYTHON_POW_SIZE:
        return np.array([pow(v, PRIME - 2, PRIME) for v in values.tolist()], dtype=np.uint64)
    result = np.ones_like(values)
    power = values
    exponent = PRIME - 2
    while exponent:
        if exponent & 1:
            result = mul_mod(result, power)
        exponent >>= 1
        if exponent:
            power = mul_mod(power, power)
    return result


def powers(xs: np.ndarray, count: int) -> np.ndarray:
    """``out[i, k] = xs[i] ** k mod PRIME`` for ``k < count``, doubling the known columns."""
    out = np.empty((xs.size, count), dtype=np.uint64)
    out[:, 0] = 1
    known = 1
    while known < count:
        step = mul_mod(out[:, known - 1], xs)[:, None]  # x ** known
        width = min(known, count - known)
        out[:, known : known + width] = mul_mod(out[:, :width], step)
        known += width
    return out


def evaluate(coefficients: np.ndarray, ids: list[int]) -> np.ndarray:
    """Evaluate polynomials at ``ids`` (distinct, in [1, PRIME)); returns ``(len(ids), n)``.

    ``coefficients`` has shape ``(degree + 1, n)``, constant terms first, entries below PRIME.
    """
    xs = np.array(ids, dtype=np.uint64)
    n_terms = coefficients.shape[0]
    if n_terms <= _MATMUL_TERMS:
        # A matrix product with the powers of each x: with the coefficients split into 16-bit
        # halves, each dot product is below n_terms * 2**47 < 2**64, so uint64 is exact.
        table = powers(xs, n_terms)
        result = np.matmul(table, coefficients & _LOW16)
        high = np.matmul(table, coefficients >> _SHIFT16)
        np.remainder(high, _P, out=high)
        np.left_shift(high, _SHIFT16, out=high)
        np.add(result, high, out=result)
        return np.remainder(result, _P, out=result)
    # Horner's rule for degrees too high for the bound above.
    column = xs[:, None]
    result = np.broadcast_to(coefficients[-1], (xs.size, coefficients.shape[1])).copy()
    for coefficient in coefficients[-2::-1]:
        # result < p and x < p, so result * x + coefficient < 2**63: no uint64 overflow.
        np.multiply(result, column, out=result)
        np.add(result, coefficient, out=result)
        np.remainder(result, _P, out=result)
    return result


def lagrange_weights(xs: np.ndarray, threshold: int) -> np.ndarray:
    """Interpolation weights for many id sets at once, shape ``(threshold, U, P)``.

    ``xs`` holds U sorted id sets of k ids each. With base = the first ``threshold`` ids and
    points = [0] + the other ids, ``f(points[e]) = sum_j w[j, u, e] * f(base[j])`` for every
    polynomial of degree below ``threshold``. Numerators are exclusive products over the base
    ids; all ``threshold`` denominators of an id set are inverted with one exponentiation
    (Montgomery's trick).
    """
    n_sets, n_ids = xs.shape
    base = np.ascontiguousarray(xs[:, :threshold].T)  # (t, U)
    points = np.zeros((n_sets, n_ids - threshold + 1), dtype=np.uint64)
    points[:, 1:] = xs[:, threshold:]
    # a - x + p lies in [1, 2p): never 0 (ids are distinct and non-zero) and below 2**32.
    numerators = exclusive_products(points[None, :, :] + (_P - base)[:, :, None])
    # denominators[j] = product over m != j of (base[j] - base[m]); factors[m, :, j].
    factors = base.T[None, :, :] + (_P - base)[:, :, None]
    factors[np.arange(threshold), :, np.arange(threshold)] = 1
    denominators = product(factors).T  # (t, U)
    others = exclusive_products(denominators)
    # 1 / d_j = (product of the other denominators) / (product of all of them).
    inverse_all = inverses(mul_mod(others[0], denominators[0]))
    inverse_denominators = mul_mod(others, inverse_all)
    return mul_mod(numerators, inverse_denominators[:, :, None])


def interpolate(
    id_sets: Sequence[tuple[int, ...]], rows: np.ndarray, threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate each secret's polynomial at 0 and at its extra ids.

    ``rows[g]`` holds secret g's shares, one per id of ``id_sets[g]`` (sorted), as field
    elements. Returns the constants ``(G, limbs)`` and, for the ids beyond the first
    ``threshold``, whether each share disagrees with the interpolated polynomial ``(G, E)``.
    Secrets with equal id sets share one weight computation.
    """
    distinct: dict[tuple[int, ...], int] = {}
    which = [distinct.setdefault(ids, len(distinct)) for ids in id_sets]
    weights = lagrange_weights(np.array(list(distinct), dtype=np.uint64), threshold)
    # Each secret's weights, taken per row j so that repeated id sets are not copied whole.
    shared = len(distinct) < len(id_sets)
    n_secrets, _, n_limbs = rows.shape
    shape = (n_secrets, weights.shape[2], n_limbs)
    values = np.zeros(shape, dtype=np.uint64)
    block = np.empty(shape, dtype=np.uint64)
    term = np.empty(shape, dtype=np.uint64)
    for start in range(0, threshold, 4):
        # Weights and shares are below 2**31, so four products sum below 2**64; the block's
        # two 31-bit halves then add up to a congruent value below 2**32, and t / 4 of those
        # cannot overflow before the final reduction.
        for j in range(start, min(start + 4, threshold)):
            weight = weights[j][which] if shared else weights[j]
            target = block if j == start else term
            np.multiply(weight[:, :, None], rows[:, None, j, :], out=target)
            if j > start:
                np.add(block, term, out=block)
        np.bitwise_and(block, _P, out=term)
        np.add(values, term, out=values)
        np.right_shift(block, _SHIFT, out=block)
        np.add(values, block, out=values)
    np.remainder(values, _P, out=values)
    mismatch = (values[:, 1:, :] != rows[:, threshold:, :]).any(axis=2)
    return values[:, 0, :], mismatch
