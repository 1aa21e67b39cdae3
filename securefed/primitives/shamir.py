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
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from securefed.errors import ConfigError, ReconstructionError
from securefed.primitives._field import PRIME, evaluate, interpolate
from securefed.primitives.randomness import RandomSource, uniform_below

__all__ = [
    "PRIME",
    "share_size",
    "share_secrets",
    "reconstruct_secret",
    "reconstruct_secrets",
    "evaluate_polynomials",
]

_LIMB_BYTES = 2
_WORD = np.dtype("<u4")
# Upper bound on the elements of one interpolation work array: a large batch is processed in
# slices of secrets this size, so memory stays bounded and the arrays stay cache-sized.
_BATCH_ELEMENTS = 1 << 16
# Type sets that the fast validation paths compare against.
_INT_TYPE = {int}
_BYTES_TYPE = {bytes}
_PLAIN_SEQUENCES = (list, tuple)


def _limb_count(secret_size: int) -> int:
    return -(-secret_size // _LIMB_BYTES)


def share_size(secret_size: int) -> int:
    """Return the size in bytes of one share of a ``secret_size``-byte secret."""
    if isinstance(secret_size, bool) or not isinstance(secret_size, int) or secret_size < 1:
        raise ConfigError(f"secret_size must be a positive int, got {secret_size!r}")
    return _WORD.itemsize * _limb_count(secret_size)


def _check_share_ids(share_ids: Sequence[int]) -> list[int]:
    if (
        type(share_ids) in _PLAIN_SEQUENCES
        and share_ids
        and set(map(type, share_ids)) == _INT_TYPE
        and min(share_ids) > 0
        and max(share_ids) < PRIME
        and len(set(share_ids)) == len(share_ids)
    ):
        # The usual case, checked with C-level passes; anything else gets itemised below.
        return list(share_ids)
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
    """Evaluate many polynomials at many points mod PRIME.

    ``coefficients`` has shape ``(degree + 1, n_polynomials)``, constant terms first, all
    entries in [0, PRIME). Returns a uint64 array of shape ``(len(share_ids), n_polynomials)``.
    """
    coefficients = np.asarray(coefficients, dtype=np.uint64)
    if coefficients.ndim != 2 or coefficients.shape[0] < 1:
        raise ConfigError(f"coefficients must have shape (degree+1, n), got {coefficients.shape}")
    if coefficients.size and int(coefficients.max()) >= PRIME:
        raise ConfigError("coefficients must be field elements in [0, 2**31 - 1)")
    return evaluate(coefficients, _check_share_ids(share_ids))


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
    # One bytes object for all evaluations, then plain slices: a share is a row's byte range.
    flat = evaluate(coefficients, ids).astype(_WORD).tobytes()
    row_bytes = _WORD.itemsize * n_limbs
    spans = []
    start = 0
    for limb in limbs:
        stop = start + _WORD.itemsize * limb.size
        spans.append((start, stop))
        start = stop
    return [
        [flat[row + begin : row + end] for begin, end in spans]
        for row in range(0, len(flat), row_bytes)
    ]


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


def _decode_one(
    shares: object, index: int, threshold: int, secret_size: int
) -> dict[int, np.ndarray]:
    """Validate and decode one secret's shares share by share (the reference order of checks)."""
    label = f"secret {index}"
    if not isinstance(shares, Mapping):
        raise ReconstructionError(f"{label}: shares must be a mapping of share id to bytes")
    decoded = _decode_shares(shares, secret_size, label)
    if len(decoded) < threshold:
        raise ReconstructionError(
            f"{label}: got {len(decoded)} shares but {threshold} are needed to reconstruct"
        )
    return decoded


def _raise_first_problem(
    shares_per_secret: Sequence[object], count: int, threshold: int, secret_size: int
) -> None:
    """Re-check the first ``count`` secrets in order and raise the first problem among them.

    The fast path checks the field range of all shares at once, after the cheap checks; this
    replay makes the reported error the first one in input order, as a one-by-one check would.
    """
    for index in range(count):
        _decode_one(shares_per_secret[index], index, threshold, secret_size)


def _fast_decode(
    shares: object, expected: int, threshold: int
) -> tuple[tuple[int, ...], bytes] | None:
    """Return (sorted share ids, the shares joined in that order), or None if anything is off.

    Only checks that need no array work are made here (the field range is checked in bulk
    later). None sends the secret through :func:`_decode_one`, which reports the problem.
    """
    if type(shares) is dict and len(shares) >= threshold:
        # The usual case, checked with C-level passes instead of a Python loop per share.
        if (
            set(map(type, shares)) == _INT_TYPE
            and set(map(type, shares.values())) == _BYTES_TYPE
            and min(shares) > 0
            and max(shares) < PRIME
            and set(map(len, shares.values())) == {expected}
        ):
            ids = tuple(sorted(shares))
            return ids, b"".join(map(shares.__getitem__, ids))
    if not isinstance(shares, Mapping):
        return None
    blobs: dict[int, bytes] = {}
    seen = 0
    for raw_id, blob in shares.items():
        seen += 1
        if type(raw_id) is not int:
            if isinstance(raw_id, bool):
                return None
            try:
                raw_id = operator.index(raw_id)
            except TypeError:
                return None
        if not 0 < raw_id < PRIME:
            return None
        if type(blob) is not bytes:
            if not isinstance(blob, bytes | bytearray | memoryview) or len(blob) != expected:
                return None
            blob = bytes(blob)
        if len(blob) != expected:
            return None
        blobs[raw_id] = blob
    # Ids that collapse onto one int would hide a share from the bulk range check.
    if seen != len(blobs) or seen < threshold:
        return None
    ids = tuple(sorted(blobs))
    return ids, b"".join([blobs[x] for x in ids])


def _batches(
    members: list[int],
    id_sets: Sequence[tuple[int, ...]],
    threshold: int,
    n_ids: int,
    n_limbs: int,
) -> Iterator[tuple[list[int], list[int]]]:
    """Split secrets with ``n_ids`` shares each into batches of bounded working memory.

    Yields (secret indices, their positions in ``members``). Secrets with equal id sets go
    into the same batch where possible, since a batch computes weights once per id set.
    """
    n_points = n_ids - threshold + 1
    # Largest work arrays: threshold x points weights and threshold x threshold denominator
    # factors per id set, points x limbs values per secret.
    set_cost = threshold * max(threshold, n_points)
    secret_cost = n_points * n_limbs
    by_set: dict[tuple[int, ...], list[int]] = {}
    for position, index in enumerate(members):
        by_set.setdefault(id_sets[index], []).append(position)
    chunk: list[int] = []
    positions: list[int] = []
    cost = 0
    for group in by_set.values():
        cost += set_cost
        for position in group:
            if positions and cost + secret_cost > _BATCH_ELEMENTS:
                yield chunk, positions
                chunk, positions, cost = [], [], set_cost
            chunk.append(members[position])
            positions.append(position)
            cost += secret_cost
    if positions:
        yield chunk, positions


def _limbs_problem(constants: np.ndarray, raw: np.ndarray, secret_size: int) -> np.ndarray:
    """Per secret: 0 if fine, 1 if a limb is not 16-bit, 2 if the padding is non-zero."""
    # Honest shares always interpolate to 16-bit limbs (and a zero pad byte for odd sizes).
    problem = np.zeros(constants.shape[0], dtype=np.int8)
    problem[raw.view(np.uint8)[:, secret_size:].any(axis=1)] = 2
    problem[(constants > 0xFFFF).any(axis=1)] = 1
    return problem


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

    All secrets with the same number of shares are interpolated together in array batches,
    so the cost per secret is a few microseconds of array work plus the decoding of its shares.
    """
    _check_threshold(threshold)
    expected = share_size(secret_size)
    n_limbs = _limb_count(secret_size)
    mappings: list[object] = []
    id_sets: list[tuple[int, ...]] = []
    joined: list[bytes] = []
    for index, shares in enumerate(shares_per_secret):
        mappings.append(shares)
        entry = _fast_decode(shares, expected, threshold)
        if entry is None:
            try:
                decoded = _decode_one(shares, index, threshold, secret_size)
            except ReconstructionError:
                # An earlier secret may hold an out-of-field share (checked in bulk below).
                _raise_first_problem(mappings, index, threshold, secret_size)
                raise
            ids = tuple(sorted(decoded))
            words = [decoded[x] for x in ids]
            if any(w.size != n_limbs for w in words):
                raise ReconstructionError(
                    f"secret {index}: a share is malformed: expected {expected} bytes"
                )
            entry = ids, np.stack(words).astype(_WORD).tobytes()
        id_sets.append(entry[0])
        joined.append(entry[1])
    n_secrets = len(id_sets)
    # Secrets with the same number of shares are stacked into one (secrets, ids, limbs) array.
    by_count: dict[int, list[int]] = {}
    for index, ids in enumerate(id_sets):
        by_count.setdefault(len(ids), []).append(index)
    stacked: list[tuple[list[int], np.ndarray]] = []
    for count, members in by_count.items():
        words = np.frombuffer(b"".join([joined[i] for i in members]), dtype=_WORD)
        if words.size and int(words.max()) >= PRIME:
            _raise_first_problem(mappings, n_secrets, threshold, secret_size)
            raise ReconstructionError("a share holds a value outside the field")
        stacked.append((members, words.reshape(len(members), count, n_limbs)))
    constants = np.empty((n_secrets, n_limbs), dtype=np.uint64)
    mismatches: dict[int, np.ndarray] = {}
    for members, words in stacked:
        for chunk, positions in _batches(members, id_sets, threshold, words.shape[1], n_limbs):
            rows = words[positions].astype(np.uint64)
            values, mismatch = interpolate([id_sets[i] for i in chunk], rows, threshold)
            constants[chunk] = values
            for position in np.flatnonzero(mismatch.any(axis=1)).tolist():
                mismatches[chunk[position]] = mismatch[position]
    raw = constants.astype("<u2")
    problems = _limbs_problem(constants, raw, secret_size)
    if mismatches or problems.any():
        _raise_inconsistency(id_sets, mismatches, problems, threshold)
    blob = raw.tobytes()
    width = raw.itemsize * n_limbs
    return [blob[i * width : i * width + secret_size] for i in range(n_secrets)]


def _raise_inconsistency(
    id_sets: Sequence[tuple[int, ...]],
    mismatches: Mapping[int, np.ndarray],
    problems: np.ndarray,
    threshold: int,
) -> None:
    """Raise for the first inconsistent secret, visiting id sets in order of first use."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, ids in enumerate(id_sets):
        groups.setdefault(ids, []).append(index)
    for ids, members in groups.items():
        disagreeing = [index for index in members if index in mismatches]
        if disagreeing:
            first = disagreeing[0]
            others = len(disagreeing) - 1
            extra = ids[threshold:]
            bad = [extra[e] for e in np.flatnonzero(mismatches[first]).tolist()]
            raise ReconstructionError(
                f"secret {first}: the shares do not lie on one polynomial of degree "
                f"{threshold - 1}: share ids {bad} disagree with share ids "
                f"{list(ids[:threshold])}; "
                "at least one share is corrupted or belongs to another secret"
                + (f" ({others} more secrets are inconsistent)" if others else "")
            )
        for index in members:
            label = f"secret {index}"
            if problems[index] == 1:
                raise ReconstructionError(
                    f"{label}: reconstructed value is not a valid secret; the shares are "
                    "inconsistent"
                )
            if problems[index] == 2:
                raise ReconstructionError(
                    f"{label}: reconstructed padding is non-zero; the shares are inconsistent"
                )


def reconstruct_secret(
    shares: Mapping[int, bytes], *, threshold: int, secret_size: int = 32
) -> bytes:
    """Reconstruct one secret from a mapping of share id -> share bytes.

    Uses ``threshold`` shares for Lagrange interpolation at zero and checks any extra shares
    against the same polynomial, raising :class:`ReconstructionError` on a mismatch.
    """
    return reconstruct_secrets([shares], threshold=threshold, secret_size=secret_size)[0]
