"""Shamir secret sharing over GF(p), p = 2**31 - 1, vectorised with numpy.

A secret of ``s`` bytes is cut into ``ceil(s/2)`` little-endian 16-bit limbs (zero-padded),
each limb being the constant term of its own random polynomial of degree ``threshold - 1``.
A share for id ``x`` is the vector of all limb-polynomials evaluated at ``x``, encoded as
little-endian uint32 words. Every field element is below 2**31, so the product of two fits
a uint64 and is reduced right after each multiply.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from securefed.errors import ConfigError, ReconstructionError
from securefed.primitives.randomness import RandomSource, uniform_below

__all__ = [
    "PRIME",
    "share_size",
    "share_secrets",
    "reconstruct_secret",
    "reconstruct_secrets",
    "evaluate_polynomials",
]

PRIME = 2**31 - 1
_P = np.uint64(PRIME)
_LIMB_BYTES = 2
_WORD = np.dtype("<u4")


def _limb_count(secret_size: int) -> int:
    return -(-secret_size // _LIMB_BYTES)


def share_size(secret_size: int) -> int:
    """Return the size in bytes of one share of a ``secret_size``-byte secret."""
    if isinstance(secret_size, bool) or not isinstance(secret_size, int) or secret_size < 1:
        raise ConfigError(f"secret_size must be a positive int, got {secret_size!r}")
    return _WORD.itemsize * _limb_count(secret_size)


def _check_share_ids(share_ids: Sequence[int]) -> list[int]:
    problems: list[str] = []
    ids: list[int] = []
    for position, raw in enumerate(share_ids):
        try:
            if isinstance(raw, bool):
                raise TypeError
            value = operator.index(raw)
        except TypeError:
            problems.append(f"share_ids[{position}] must be an int, got {type(raw).__name__}")
            continue
        if not 1 <= value < PRIME:
            problems.append(f"share_ids[{position}] = {value} is outside [1, 2**31 - 1)")
        ids.append(value)
    duplicates = sorted(value for value, count in Counter(ids).items() if count > 1)
    if duplicates:
        problems.append(f"share_ids must be distinct; repeated: {duplicates}")
    if problems:
        raise ConfigError(problems)
    return ids


def _check_threshold(threshold: int) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise ConfigError(f"threshold must be an int, got {type(threshold).__name__}")
    if threshold < 1:
        raise ConfigError(f"threshold must be >= 1, got {threshold}")
    return threshold


def evaluate_polynomials(coefficients: np.ndarray, share_ids: Sequence[int]) -> np.ndarray:
    """Evaluate many polynomials at many points mod PRIME (Horner's rule).

    ``coefficients`` has shape ``(degree + 1, n_polynomials)``, constant terms first, all
    entries in [0, PRIME). Returns a uint64 array of shape ``(len(share_ids), n_polynomials)``.
    """
    coefficients = np.asarray(coefficients, dtype=np.uint64)
    if coefficients.ndim != 2 or coefficients.shape[0] < 1:
        raise ConfigError(f"coefficients must have shape (degree+1, n), got {coefficients.shape}")
    if coefficients.size and int(coefficients.max()) >= PRIME:
        raise ConfigError("coefficients must be field elements in [0, 2**31 - 1)")
    xs = np.asarray(_check_share_ids(share_ids), dtype=np.uint64)[:, None]
    result = np.broadcast_to(coefficients[-1], (xs.shape[0], coefficients.shape[1])).copy()
    for coefficient in coefficients[-2::-1]:
        # result < p and x < p, so result * x + coefficient < 2**63: no uint64 overflow.
        np.multiply(result, xs, out=result)
        np.add(result, coefficient, out=result)
        np.remainder(result, _P, out=result)
    return result


def _secret_limbs(secret: bytes, position: int) -> np.ndarray:
    if not isinstance(secret, bytes | bytearray | memoryview):
        raise ConfigError(f"secrets[{position}] must be bytes, got {type(secret).__name__}")
    if len(secret) == 0:
        raise ConfigError(f"secrets[{position}] is empty; there is nothing to share")
    padded = bytes(secret) + bytes(len(secret) % _LIMB_BYTES)
    return np.frombuffer(padded, dtype="<u2").astype(np.uint64)


def share_secrets(
    secrets: Sequence[bytes],
    *,
    threshold: int,
    share_ids: Sequence[int],
    rng: RandomSource,
) -> list[list[bytes]]:
    """Split secrets into shares: ``result[j][i]`` is share ``share_ids[j]`` of ``secrets[i]``.

    Any ``threshold`` shares of a secret reconstruct it; fewer reveal nothing about it. All
    secrets and all share ids are handled in one batch of array operations. Secrets may
    differ in length; each share of a secret has ``share_size(len(secret))`` bytes.
    """
    ids = _check_share_ids(share_ids)
    _check_threshold(threshold)
    if threshold > len(ids):
        raise ConfigError(
            f"threshold {threshold} exceeds the {len(ids)} share ids given; "
            "lower the threshold or add share ids"
        )
    limbs = [_secret_limbs(secret, i) for i, secret in enumerate(secrets)]
    if not limbs:
        return [[] for _ in ids]
    constant_terms = np.concatenate(limbs)
    n_limbs = constant_terms.size
    coefficients = np.empty((threshold, n_limbs), dtype=np.uint64)
    coefficients[0] = constant_terms
    coefficients[1:] = uniform_below(rng, PRIME, (threshold - 1) * n_limbs).reshape(
        threshold - 1, n_limbs
    )
    evaluations = evaluate_polynomials(coefficients, ids).astype(_WORD)
    bounds = np.cumsum([0] + [limb.size for limb in limbs])
    return [
        [row[bounds[i] : bounds[i + 1]].tobytes() for i in range(len(limbs))] for row in evaluations
    ]


def _lagrange_weights(xs: Sequence[int], at: int) -> list[int]:
    """Weights w_j with f(at) = sum_j w_j * f(xs[j]) for every polynomial of degree < len(xs)."""
    weights = []
    for j, xj in enumerate(xs):
        numerator = 1
        denominator = 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator = numerator * (at - xm) % PRIME
                denominator = denominator * (xj - xm) % PRIME
        weights.append(numerator * pow(denominator, PRIME - 2, PRIME) % PRIME)
    return weights


def _combine(weights: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """Return sum_j weights[j] * rows[j] mod PRIME, row by row to keep values below 2**63."""
    total = np.zeros(rows.shape[1], dtype=np.uint64)
    term = np.empty_like(total)
    for weight, row in zip(weights, rows, strict=True):
        np.multiply(row, np.uint64(weight), out=term)
        np.remainder(term, _P, out=term)
        np.add(total, term, out=total)
        np.remainder(total, _P, out=total)
    return total


def _decode_shares(
    shares: Mapping[int, bytes], secret_size: int, label: str
) -> dict[int, np.ndarray]:
    expected = share_size(secret_size)
    decoded: dict[int, np.ndarray] = {}
    for raw_id, blob in shares.items():
        try:
            if isinstance(raw_id, bool):
                raise TypeError
            share_id = operator.index(raw_id)
        except TypeError:
            raise ReconstructionError(f"{label}: share id {raw_id!r} is not an int") from None
        if not 1 <= share_id < PRIME:
            raise ReconstructionError(f"{label}: share id {share_id} is outside [1, 2**31 - 1)")
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise ReconstructionError(
                f"{label}: share {share_id} must be bytes, got {type(blob).__name__}"
            )
        if len(blob) != expected:
            raise ReconstructionError(
                f"{label}: share {share_id} is malformed: expected {expected} bytes for a "
                f"{secret_size}-byte secret, got {len(blob)}"
            )
        words = np.frombuffer(bytes(blob), dtype=_WORD).astype(np.uint64)
        if words.size and int(words.max()) >= PRIME:
            raise ReconstructionError(f"{label}: share {share_id} holds a value outside the field")
        decoded[share_id] = words
    return decoded


def _reconstruct_group(
    ids: Sequence[int], rows: np.ndarray, threshold: int, indices: Sequence[int], n_limbs: int
) -> np.ndarray:
    """Interpolate at zero from the first ``threshold`` ids and check every other id agrees.

    ``rows[k]`` holds share id ``ids[k]`` of every secret in the group, one block of
    ``n_limbs`` columns per secret (``indices`` gives each block's position in the batch).
    """
    base, extra = list(ids[:threshold]), list(ids[threshold:])
    constant = _combine(_lagrange_weights(base, 0), rows[:threshold])
    disagreeing: dict[int, list[int]] = {}
    for offset, x in enumerate(extra):
        predicted = _combine(_lagrange_weights(base, x), rows[:threshold])
        mismatch = (predicted != rows[threshold + offset]).reshape(len(indices), n_limbs)
        for block in np.flatnonzero(mismatch.any(axis=1)):
            disagreeing.setdefault(indices[block], []).append(x)
    if disagreeing:
        first = min(disagreeing)
        others = len(disagreeing) - 1
        raise ReconstructionError(
            f"secret {first}: the shares do not lie on one polynomial of degree "
            f"{threshold - 1}: share ids {disagreeing[first]} disagree with share ids {base}; "
            "at least one share is corrupted or belongs to another secret"
            + (f" ({others} more secrets are inconsistent)" if others else "")
        )
    return constant


def _limbs_to_secret(limbs: np.ndarray, secret_size: int, label: str) -> bytes:
    # Honest shares always interpolate to 16-bit limbs (and a zero pad byte for odd sizes).
    if limbs.size and int(limbs.max()) > 0xFFFF:
        raise ReconstructionError(
            f"{label}: reconstructed value is not a valid secret; the shares are inconsistent"
        )
    raw = limbs.astype("<u2").tobytes()
    if any(raw[secret_size:]):
        raise ReconstructionError(
            f"{label}: reconstructed padding is non-zero; the shares are inconsistent"
        )
    return raw[:secret_size]


def reconstruct_secrets(
    shares_per_secret: Sequence[Mapping[int, bytes]],
    *,
    threshold: int,
    secret_size: int = 32,
) -> list[bytes]:
    """Reconstruct many secrets; those shared among the same ids use one Lagrange computation.

    Each mapping is share id -> share bytes for one secret. Raises
    :class:`ReconstructionError` if a secret has fewer than ``threshold`` shares, a share is
    malformed, or shares beyond the first ``threshold`` do not fit the same polynomial.
    """
    _check_threshold(threshold)
    share_size(secret_size)
    n_limbs = _limb_count(secret_size)
    groups: dict[tuple[int, ...], list[tuple[int, dict[int, np.ndarray]]]] = {}
    for index, shares in enumerate(shares_per_secret):
        label = f"secret {index}"
        if not isinstance(shares, Mapping):
            raise ReconstructionError(f"{label}: shares must be a mapping of share id to bytes")
        decoded = _decode_shares(shares, secret_size, label)
        if len(decoded) < threshold:
            raise ReconstructionError(
                f"{label}: got {len(decoded)} shares but {threshold} are needed to reconstruct"
            )
        # Sorting makes the interpolation set, and so any error message, independent of order.
        groups.setdefault(tuple(sorted(decoded)), []).append((index, decoded))
    results: list[bytes] = [b""] * len(shares_per_secret)
    for ids, members in groups.items():
        # One column block per secret: rows are share ids, columns all limbs of the group.
        rows = np.stack([np.concatenate([decoded[x] for _, decoded in members]) for x in ids])
        indices = [index for index, _ in members]
        constants = _reconstruct_group(ids, rows, threshold, indices, n_limbs)
        for position, (index, _) in enumerate(members):
            limbs = constants[position * n_limbs : (position + 1) * n_limbs]
            results[index] = _limbs_to_secret(limbs, secret_size, f"secret {index}")
    return results


def reconstruct_secret(
    shares: Mapping[int, bytes], *, threshold: int, secret_size: int = 32
) -> bytes:
    """Reconstruct one secret from a mapping of share id -> share bytes.

    Uses ``threshold`` shares for Lagrange interpolation at zero and checks any extra shares
    against the same polynomial, raising :class:`ReconstructionError` on a mismatch.
    """
    return reconstruct_secrets([shares], threshold=threshold, secret_size=secret_size)[0]
