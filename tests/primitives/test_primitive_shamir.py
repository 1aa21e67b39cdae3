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


def _reference_reconstruct(shares: dict[int, bytes], threshold: int, secret_size: int) -> bytes:
    """Plain Lagrange interpolation at zero with Python ints, from the smallest ids."""
    ids = sorted(shares)[:threshold]
    words = {x: np.frombuffer(shares[x], dtype="<u4").tolist() for x in ids}
    limbs = []
    for column in range(len(words[ids[0]])):
        total = 0
        for j, xj in enumerate(ids):
            numerator = denominator = 1
            for xm in ids:
                if xm != xj:
                    numerator = numerator * -xm % PRIME
                    denominator = denominator * (xj - xm) % PRIME
            total += words[xj][column] * numerator * pow(denominator, PRIME - 2, PRIME)
        limbs.append(total % PRIME)
    return b"".join(limb.to_bytes(2, "little") for limb in limbs)[:secret_size]


def _many_secrets(count: int, n_ids: int, threshold: int, seed: int) -> tuple[list, list]:
    """Secrets each shared among its own random id set (some sets repeat)."""
    rnd = random.Random(seed)
    secrets, per_secret = [], []
    repeated = rnd.sample(range(1, 5000), n_ids)
    for i in range(count):
        ids = repeated if i % 5 == 0 else rnd.sample(range(1, 5000), n_ids)
        secret = rnd.randbytes(32)
        shares = share_secrets([secret], threshold=threshold, share_ids=ids, rng=SeededRandom(i))
        secrets.append(secret)
        per_secret.append({x: shares[j][0] for j, x in enumerate(ids)})
    return secrets, per_secret


@pytest.mark.parametrize("batch_elements", [1, 700, 1 << 16])
@pytest.mark.parametrize("scan_size", [1, 1 << 30])
@pytest.mark.parametrize("pow_size", [0, 16])
def test_batched_reconstruction_matches_reference(
    monkeypatch: pytest.MonkeyPatch, batch_elements: int, scan_size: int, pow_size: int
) -> None:
    # Every batching and every code path of the weight computation must give the same result.
    from securefed.primitives import _field, shamir

    monkeypatch.setattr(shamir, "_BATCH_ELEMENTS", batch_elements)
    monkeypatch.setattr(_field, "_SEQUENTIAL_SCAN_SIZE", scan_size)
    monkeypatch.setattr(_field, "_PYTHON_POW_SIZE", pow_size)
    secrets, per_secret = _many_secrets(40, 9, 4, seed=batch_elements + scan_size + pow_size)
    # Drop some shares so the batch mixes secrets with different share counts.
    for i in range(0, 40, 3):
        for x in sorted(per_secret[i])[: i % 5]:
            del per_secret[i][x]
    assert reconstruct_secrets(per_secret, threshold=4) == secrets
    for i in (0, 1, 7):
        assert _reference_reconstruct(per_secret[i], 4, 32) == secrets[i]


def test_every_corrupted_share_is_detected_in_a_batch() -> None:
    # A wrong share among the interpolation base shifts the polynomial by a multiple of a
    # Lagrange basis polynomial, which is non-zero at every other id: all extras disagree.
    threshold, n_ids = 18, 35
    secrets, per_secret = _many_secrets(12, n_ids, threshold, seed=3)
    victim = 5
    ids = sorted(per_secret[victim])
    for position, x in enumerate(ids):
        corrupted = [dict(shares) for shares in per_secret]
        blob = bytearray(corrupted[victim][x])
        blob[4 * (position % 16)] ^= 0x01
        corrupted[victim][x] = bytes(blob)
        with pytest.raises(ReconstructionError) as info:
            reconstruct_secrets(corrupted, threshold=threshold)
        extras = ids[threshold:]
        disagreeing = [x] if position >= threshold else extras
        assert str(info.value) == (
            f"secret {victim}: the shares do not lie on one polynomial of degree "
            f"{threshold - 1}: share ids {disagreeing} disagree with share ids "
            f"{ids[:threshold]}; at least one share is corrupted or belongs to another secret"
        )
    assert reconstruct_secrets(per_secret, threshold=threshold) == secrets


def test_inconsistent_secrets_are_reported_per_id_set_in_order() -> None:
    secrets = [bytes([i]) * 32 for i in range(4)]
    shares = share_secrets(secrets, threshold=2, share_ids=[1, 2, 3, 4], rng=SeededRandom(6))
    per_secret = [{j + 1: shares[j][i] for j in range(4)} for i in range(4)]
    del per_secret[0][4]  # secret 0 alone uses ids 1-3, so it is its own group
    per_secret[3][3] = per_secret[1][3]
    per_secret[2][4] = per_secret[1][4]
    with pytest.raises(ReconstructionError) as info:
        reconstruct_secrets(per_secret, threshold=2)
    assert str(info.value).startswith("secret 2: ")
    assert str(info.value).endswith("(1 more secrets are inconsistent)")
    assert "share ids [4] disagree with share ids [1, 2]" in str(info.value)


def test_decoding_errors_are_reported_in_input_order() -> None:
    shares = share_secrets([bytes(32)] * 2, threshold=2, share_ids=[1, 2], rng=SeededRandom(2))
    out_of_field = (PRIME).to_bytes(4, "little") + shares[1][0][4:]
    first = {1: shares[0][0], 2: out_of_field}
    second = {1: shares[0][1], 2: shares[1][1][:-1]}
    # The first secret's out-of-field share comes first, though the second's is found first.
    with pytest.raises(ReconstructionError, match="secret 0: share 2 holds a value outside"):
        reconstruct_secrets([first, second], threshold=2)
    with pytest.raises(ReconstructionError, match="secret 1: share 2 is malformed"):
        reconstruct_secrets([{1: shares[0][0], 2: shares[1][0]}, second], threshold=2)
    with pytest.raises(ReconstructionError, match="secret 1: share 2 holds a value outside"):
        reconstruct_secrets([{1: shares[0][0], 2: shares[1][0]}, first], threshold=2)
    # Ids given as numpy ints, shares as bytearray or memoryview go the same way as plain ones.
    mixed = {np.int64(1): bytearray(shares[0][0]), 2: memoryview(shares[1][0])}
    assert reconstruct_secrets([mixed], threshold=2) == [bytes(32)]


def test_polynomial_evaluation_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    from securefed.primitives import _field

    rng = np.random.default_rng(11)
    for degree in (0, 1, 5, 17, 70):
        coefficients = rng.integers(0, PRIME, size=(degree + 1, 7), dtype=np.uint64)
        ids = [int(x) for x in rng.choice(np.arange(1, 10**6), size=9, replace=False)]
        fast = evaluate_polynomials(coefficients, ids)
        monkeypatch.setattr(_field, "_MATMUL_TERMS", 0)
        horner = evaluate_polynomials(coefficients, ids)
        monkeypatch.undo()
        assert np.array_equal(fast, horner)
        assert fast[:, 0].tolist() == [_python_eval(coefficients[:, 0].tolist(), x) for x in ids]


def test_polynomial_evaluation_at_the_overflow_bound() -> None:
    from securefed.primitives import _field

    # The most terms one uint64 matrix product sums, every coefficient at its maximum.
    terms = _field._MATMUL_TERMS
    coefficients = np.full((terms, 2), PRIME - 1, dtype=np.uint64)
    got = evaluate_polynomials(coefficients, [1, PRIME - 1])
    # At x = 1 the sum is terms * (p - 1); at x = -1 the terms alternate in sign.
    assert got[0].tolist() == [terms * (PRIME - 1) % PRIME] * 2
    assert got[1].tolist() == [(PRIME - 1) * (terms % 2) % PRIME] * 2
