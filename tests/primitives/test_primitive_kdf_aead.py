"""Tests for securefed.primitives.kdf and securefed.primitives.aead."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.errors import ConfigError, CryptoError, DecryptionError
from securefed.primitives.aead import KEY_SIZE, NONCE_SIZE, open_sealed, seal
from securefed.primitives.kdf import hkdf_sha256
from securefed.primitives.randomness import SeededRandom, SystemRandom

HKDF_VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "hkdf_sha256.json").read_text()
)


@pytest.mark.parametrize("case", HKDF_VECTORS["cases"], ids=lambda c: c["name"])
def test_hkdf_rfc5869(case: dict) -> None:
    ikm, salt, info = (bytes.fromhex(case[k]) for k in ("ikm", "salt", "info"))
    okm = hkdf_sha256(ikm, salt=salt, info=info, length=case["length"])
    assert okm.hex() == case["okm"]
    # Independent check of the extract step with the standard library's HMAC.
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).hexdigest()
    assert prk == case["prk"]


@settings(max_examples=60, deadline=None)
@given(
    ikm=st.binary(min_size=1, max_size=64),
    salt=st.binary(max_size=64),
    info=st.binary(max_size=80),
    length=st.integers(min_value=1, max_value=200),
)
def test_hkdf_agrees_with_cryptography(ikm: bytes, salt: bytes, info: bytes, length: int) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    reference = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info)
    assert hkdf_sha256(ikm, salt=salt, info=info, length=length) == reference.derive(ikm)


def test_hkdf_separates_domains_and_validates_length() -> None:
    a = hkdf_sha256(b"k", salt=b"s", info=b"mask")
    assert len(a) == 32
    assert a != hkdf_sha256(b"k", salt=b"s", info=b"aead")
    with pytest.raises(ConfigError):
        hkdf_sha256(b"k", salt=b"", info=b"", length=0)
    with pytest.raises(ConfigError):
        hkdf_sha256(b"k", salt=b"", info=b"", length=255 * 32 + 1)


KEY = bytes(range(KEY_SIZE))


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=300), ad=st.binary(max_size=40))
def test_aead_round_trip(plaintext: bytes, ad: bytes) -> None:
    sealed = seal(KEY, plaintext, associated_data=ad, rng=SystemRandom())
    assert len(sealed) == NONCE_SIZE + len(plaintext) + 16
    assert open_sealed(KEY, sealed, associated_data=ad) == plaintext


def test_aead_nonces_are_fresh() -> None:
    rng = SeededRandom(1)
    first = seal(KEY, b"m", associated_data=b"", rng=rng)
    second = seal(KEY, b"m", associated_data=b"", rng=rng)
    assert first[:NONCE_SIZE] != second[:NONCE_SIZE] and first != second


@settings(max_examples=40, deadline=None)
@given(position=st.integers(min_value=0, max_value=NONCE_SIZE + 5 + 16 - 1), bit=st.integers(0, 7))
def test_aead_any_bit_flip_is_detected(position: int, bit: int) -> None:
    sealed = bytearray(seal(KEY, b"hello", associated_data=b"round-1", rng=SeededRandom(2)))
    sealed[position] ^= 1 << bit
    with pytest.raises(DecryptionError):
        open_sealed(KEY, bytes(sealed), associated_data=b"round-1")


def test_aead_wrong_ad_key_and_truncation() -> None:
    sealed = seal(KEY, b"payload", associated_data=b"round-1", rng=SeededRandom(3))
    with pytest.raises(DecryptionError):
        open_sealed(KEY, sealed, associated_data=b"round-2")
    with pytest.raises(DecryptionError):
        open_sealed(bytes(KEY_SIZE), sealed, associated_data=b"round-1")
    for cut in (0, 10, NONCE_SIZE + 15, len(sealed) - 1):
        with pytest.raises(DecryptionError):
            open_sealed(KEY, sealed[:cut], associated_data=b"round-1")
    with pytest.raises(DecryptionError):
        open_sealed(KEY[:16], sealed, associated_data=b"round-1")


def test_aead_rejects_bad_key_on_seal() -> None:
    with pytest.raises(CryptoError):
        seal(b"short", b"m", associated_data=b"", rng=SystemRandom())
