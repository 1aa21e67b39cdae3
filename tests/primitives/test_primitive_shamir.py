"""Tests for securefed.primitives.shamir."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.errors import ConfigError, ReconstructionError
from securefed.primitives.randomness import SeededRandom
from securefed.primitives.shamir import (
    PRIME,
    evaluate_polynomials,
    reconstruct_secret,
    reconstruct_secrets,
    share_secrets,
    share_size,
)

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "shamir.json").read_text())


def _python_eval(coefficients: list[int], x: int) -> int:
    """Reference evaluation with Python big ints, no intermediate reduction."""
    return sum(c * x**k for k, c in enumerate(coefficients)) % PRIME


def test_vector_prime() -> None:
    assert VECTORS["prime"] == PRIME == 2**31 - 1


@pytest.mark.parametrize("case", VECTORS["polynomials"], ids=lambda c: c["name"])
def test_polynomial_known_answers(case: dict) -> None:
    got = evaluate_polynomials(np.array(case["coefficients"], dtype=np.uint64), case["share_ids"])
    assert got.tolist() == case["evaluations"]
    columns = list(zip(*case["coefficients"]))
    for i, x in enumerate(case["share_ids"]):
        assert [_python_eval(list(col), x) for col in columns] == case["evaluations"][i]


@pytest.mark.parametrize("case", VECTORS["secrets"], ids=lambda c: c["name"])
def test_secret_known_answers(case: dict) -> None:
    secret = bytes.fromhex(case["secret"])
    padded = secret + bytes(len(secret) % 2)
    limbs = [int.from_bytes(padded[i : i + 2], "little") for i in range(0, len(padded), 2)]
    higher = case["higher_coefficients"]
    for share_id in case["share_ids"]:
        expected = b"".join(
            _python_eval([limb] + [row[j] for row in higher], share_id).to_bytes(4, "little")
            for j, limb in enumerate(limbs)
        )
        assert case["shares"][str(share_id)] == expected.hex()
    shares = {int(k): bytes.fromhex(v) for k, v in case["shares"].items()}
    assert (
        reconstruct_secret(shares, threshold=case["threshold"], secret_size=len(secret)) == secret
    )


@pytest.mark.parametrize("case", VECTORS["seeded"], ids=lambda c: c["name"])
def test_seeded_regression(case: dict) -> None:
    secrets = [bytes.fromhex(s) for s in case["secrets"]]
    shares = share_secrets(
        secrets,
        threshold=case["threshold"],
        share_ids=case["share_ids"],
        rng=SeededRandom(case["seed"]),
    )
    assert [[b.hex() for b in row] for row in shares] == case["shares"]


@settings(max_examples=60, deadline=None)
@given(
    n_parties=st.integers(min_value=1, max_value=12),
    data=st.data(),
    secret_size=st.sampled_from([1, 2, 5, 16, 32]),
    n_secrets=st.integers(min_value=1, max_value=4),
)
def test_share_reconstruct_round_trip(
    n_parties: int, data: st.DataObject, secret_size: int, n_secrets: int
) -> None:
    threshold = data.draw(st.integers(min_value=1, max_value=n_parties))
    ids = data.draw(
        st.lists(st.integers(1, PRIME - 1), min_size=n_parties, max_size=n_parties, unique=True)
    )
    secrets = [
        data.draw(st.binary(min_size=secret_size, max_size=secret_size)) for _ in range(n_secrets)
    ]
    seed = data.draw(st.integers(0, 2**32))
    shares = share_secrets(secrets, threshold=threshold, share_ids=ids, rng=SeededRandom(seed))
    assert len(shares) == n_parties and all(len(row) == n_secrets for row in shares)
    assert all(len(s) == share_size(secret_size) for row in shares for s in row)
    subset = data.draw(
        st.lists(
            st.sampled_from(range(n_parties)), min_size=threshold, max_size=n_parties, unique=True
        )
    )
    per_secret = [{ids[j]: shares[j][i] for j in subset} for i in range(n_secrets)]
    assert reconstruct_secrets(per_secret, threshold=threshold, secret_size=secret_size) == secrets
    assert (
        reconstruct_secret(per_secret[0], threshold=threshold, secret_size=secret_size)
        == secrets[0]
    )


def test_fewer_than_threshold_shares_raise() -> None:
    shares = share_secrets(
        [bytes(range(32))], threshold=3, share_ids=[1, 2, 3, 4], rng=SeededRandom(0)
    )
    with pytest.raises(ReconstructionError, match=r"got 2 shares but 3 are needed"):
        reconstruct_secret({1: shares[0][0], 2: shares[1][0]}, threshold=3)
    with pytest.raises(ReconstructionError):
        reconstruct_secret({}, threshold=1)


def test_below_threshold_shares_are_independent_of_the_secret() -> None:
    # With the same randomness, t-1 shares of two different secrets differ only through the
    # secret; over many seeds the first limb of one share must look uniform for both.
    values = {0: [], 1: []}
    for seed in range(400):
        for which, secret in enumerate((bytes(32), b"\xff" * 32)):
            share = share_secrets([secret], threshold=2, share_ids=[5, 6], rng=SeededRandom(seed))[
                0
            ][0]
            values[which].append(int.from_bytes(share[:4], "little") / PRIME)
    for sample in values.values():
        assert abs(np.mean(sample) - 0.5) < 6 * np.sqrt(1 / 12 / len(sample))


def test_corrupted_share_is_detected() -> None:
    secret = bytes(range(32))
    shares = share_secrets([secret], threshold=3, share_ids=[1, 2, 3, 4, 5], rng=SeededRandom(9))
    mapping = {i + 1: shares[i][0] for i in range(5)}
    assert reconstruct_secret(mapping, threshold=3) == secret
    for victim in mapping:
        corrupted = dict(mapping)
        blob = bytearray(corrupted[victim])
        blob[7] ^= 0x01
        corrupted[victim] = bytes(blob)
        with pytest.raises(ReconstructionError, match="do not lie on one polynomial"):
            reconstruct_secret(corrupted, threshold=3)


def test_batch_reports_the_inconsistent_secret() -> None:
    secrets = [bytes([i]) * 32 for i in range(3)]
    shares = share_secrets(secrets, threshold=2, share_ids=[1, 2, 3], rng=SeededRandom(4))
    per_secret = [{j + 1: shares[j][i] for j in range(3)} for i in range(3)]
    per_secret[2][3] = per_secret[1][3]  # a share of another secret slipped in
    with pytest.raises(ReconstructionError, match="secret 2"):
        reconstruct_secrets(per_secret, threshold=2)


def test_batch_with_different_id_sets() -> None:
    secrets = [random.Random(i).randbytes(32) for i in range(4)]
    shares = share_secrets(secrets, threshold=2, share_ids=[3, 5, 7, 11], rng=SeededRandom(8))
    subsets = [(0, 1), (2, 3), (0, 1), (0, 1, 2, 3)]
    per_secret = [
        {[3, 5, 7, 11][j]: shares[j][i] for j in subset} for i, subset in enumerate(subsets)
    ]
    assert reconstruct_secrets(per_secret, threshold=2) == secrets


def test_malformed_shares_raise() -> None:
    shares = share_secrets([bytes(32)], threshold=2, share_ids=[1, 2], rng=SeededRandom(1))
    good = {1: shares[0][0], 2: shares[1][0]}
    for bad in (
        {1: good[1][:-1], 2: good[2]},
        {1: good[1], 2: b"\xff" * 64},
        {0: good[1], 2: good[2]},
    ):
        with pytest.raises(ReconstructionError):
            reconstruct_secret(bad, threshold=2)


def test_sharing_validation() -> None:
    rng = SeededRandom(0)
    with pytest.raises(ConfigError):
        share_secrets([bytes(32)], threshold=3, share_ids=[1, 2], rng=rng)
    with pytest.raises(ConfigError):
        share_secrets([bytes(32)], threshold=2, share_ids=[1, 1, 2], rng=rng)
    with pytest.raises(ConfigError):
        share_secrets([bytes(32)], threshold=2, share_ids=[0, 1], rng=rng)
    with pytest.raises(ConfigError):
        share_secrets([bytes(32)], threshold=2, share_ids=[1, PRIME], rng=rng)
    with pytest.raises(ConfigError):
        share_secrets([bytes(32)], threshold=0, share_ids=[1, 2], rng=rng)
    with pytest.raises(ConfigError):
        share_secrets([b""], threshold=1, share_ids=[1], rng=rng)
    assert share_size(32) == 64 and share_size(33) == 68
