"""Encrypted aggregation: sums match plaintext within CKKS error; the coordinator cannot decrypt and
refuses unsigned, altered, foreign-context and wrong-size uploads while the round goes on."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from securefed.errors import ConfigError, DecryptionError, MalformedMessageError, ProtocolAbort
from securefed.he.aggregator import HEAggregator
from securefed.he.config import HEConfig
from securefed.he.keys import context_digest
from securefed.he.messages import EncryptedUpload
from securefed.he.recipes import encrypted_sum
from securefed.he.tenseal_ckks import CKKSCodec, new_context
from securefed.primitives.identity import SiteIdentity
from securefed.primitives.roster import Roster

CONFIG = HEConfig()
# CKKS error at scale 2^40 is ~1e-9 per value for a handful of sites; this bound is loose enough
# for 10 sites and still far below the 1e-6 of an update's scale that training needs.
TOLERANCE = 1e-7


def test_weighted_sum_with_a_dropout_matches_the_plaintext_sum():
    rng = np.random.default_rng(0)
    vectors = rng.normal(0, 0.05, (6, 9000))  # 9001 values: three ciphertexts of 4096 slots
    weights = np.array([1.0, 0.5, 1.0, 0.25, 0.8, 1.0])
    result = encrypted_sum(vectors, weights=weights, dropouts=[2], seed=3)
    survivors = [0, 1, 3, 4, 5]
    assert result.survivors == set(survivors)
    expected = (weights[survivors, None] * vectors[survivors]).sum(axis=0)
    assert np.abs(result.total - expected).max() < TOLERANCE
    assert result.total_weight == pytest.approx(weights[survivors].sum(), abs=TOLERANCE)
    np.testing.assert_allclose(result.mean, expected / weights[survivors].sum(), atol=TOLERANCE)


def test_a_real_model_update_sums_within_the_ckks_error():
    torch = pytest.importorskip("torch")
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2))
    base = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().astype(np.float64)
    rng = np.random.default_rng(1)
    updates = np.stack([base * rng.normal(0, 0.01, base.size) for _ in range(4)])  # update-sized steps
    result = encrypted_sum(updates, seed=0)
    scale = np.abs(updates).max()
    assert np.abs(result.total - updates.sum(axis=0)).max() / scale < 1e-6


def test_values_beyond_clip_are_clipped_like_secure_aggregation():
    result = encrypted_sum(np.array([[3.0, -3.0, 0.5], [0.0, 0.0, 0.0]]), seed=0)
    np.testing.assert_allclose(result.total, [1.0, -1.0, 0.5], atol=TOLERANCE)


def test_the_coordinator_holds_no_key_and_no_plaintext():
    rng = np.random.default_rng(2)
    vectors = rng.normal(0, 0.05, (3, 500))
    result = encrypted_sum(vectors, seed=5)
    view = result.coordinator_view
    coordinator = CKKSCodec(CONFIG, view.public_context)
    assert not coordinator.holds_secret_key
    upload = EncryptedUpload.decode(view.uploads[0])
    with pytest.raises(DecryptionError):
        coordinator.decrypt(upload.ciphertexts, length=501)
    with pytest.raises(ConfigError, match="no secret key"):
        coordinator.encrypt(vectors[0])
    for data in view.uploads.values():  # no site's values, as float32 or float64, in what it received
        for row in vectors:
            assert row[:8].tobytes() not in data and row[:16].astype(np.float32).tobytes() not in data


@pytest.fixture()
def round_parts():
    identities = [SiteIdentity.generate(f"s{i}") for i in range(4)]
    roster = Roster([i.public() for i in identities])
    secret, public = new_context(CONFIG)
    site, coordinator = CKKSCodec(CONFIG, secret), CKKSCodec(CONFIG, public)
    digest = context_digest(public)
    values = np.random.default_rng(3).normal(0, 0.05, (4, 100))

    def upload(i, *, round_id=7, digest=digest, values_=None, sign_as=None):
        ciphertexts = tuple(site.encrypt(values[i] if values_ is None else values_, append_weight=True))
        unsigned = EncryptedUpload(round_id, i, digest, 101, ciphertexts)
        signer = identities[i] if sign_as is None else sign_as
        return dataclasses.replace(unsigned, signature=signer.sign(unsigned.statement()))

    def aggregator():
        return HEAggregator(roster=roster, round_id=7, participants=range(4), context_digest=digest, length=101,
                            ciphertexts=1, minimum=2)

    return identities, site, coordinator, values, upload, aggregator


def test_bad_uploads_are_refused_and_the_honest_ones_still_sum(round_parts):
    identities, site, coordinator, values, upload, aggregator = round_parts
    agg = aggregator()
    agg.receive(upload(0).encode(), from_site=0)
    good = upload(1).encode()
    altered = bytearray(good)
    altered[200] ^= 1  # inside a ciphertext: the signature no longer matches
    with pytest.raises(ProtocolAbort, match="not signed"):
        agg.receive(bytes(altered), from_site=1)
    with pytest.raises(ProtocolAbort, match="not signed"):
        agg.receive(dataclasses.replace(upload(2), signature=bytes(64)).encode(), from_site=2)  # unsigned
    with pytest.raises(ProtocolAbort, match="another CKKS context"):
        agg.receive(upload(3, digest=context_digest(b"someone else's key")).encode(), from_site=3)
    with pytest.raises(ProtocolAbort, match="round"):
        agg.receive(upload(1, round_id=6).encode(), from_site=1)
    with pytest.raises(ProtocolAbort, match="names sender"):
        agg.receive(upload(1).encode(), from_site=2)  # relayed under another site's name
    with pytest.raises(MalformedMessageError):
        agg.receive(b"\x00" * 40, from_site=3)
    agg.receive(good, from_site=1)
    with pytest.raises(ProtocolAbort, match="already"):
        agg.receive(good, from_site=1)
    total = agg.finish(coordinator.add)
    assert total.survivors == {0, 1} and set(total.rejected) == {1, 2, 3}
    out = site.decrypt(total.ciphertexts, length=101)
    np.testing.assert_allclose(out[:-1], values[0] + values[1], atol=TOLERANCE)


def test_a_signed_upload_of_the_wrong_size_or_garbage_ciphertexts_is_left_out(round_parts):
    identities, site, coordinator, values, upload, aggregator = round_parts
    agg = aggregator()
    agg.receive(upload(0).encode(), from_site=0)
    agg.receive(upload(1).encode(), from_site=1)
    with pytest.raises(MalformedMessageError, match="expects 101"):
        agg.receive(upload(2, values_=np.zeros(5000)).encode(), from_site=2)  # 5001 values in 2 ciphertexts
    garbage = EncryptedUpload(7, 3, context_digest(b"x"), 101, (os.urandom(300),))
    garbage = dataclasses.replace(garbage, context_digest=agg.context_digest)
    garbage = dataclasses.replace(garbage, signature=identities[3].sign(garbage.statement()))
    agg.receive(garbage.encode(), from_site=3)  # well signed, but not a ciphertext: found when adding
    total = agg.finish(coordinator.add)
    assert total.survivors == {0, 1} and "not valid" in total.rejected[3]
    np.testing.assert_allclose(site.decrypt(total.ciphertexts, length=101)[:-1], values[0] + values[1],
                               atol=TOLERANCE)


def test_too_few_valid_uploads_abort_the_round(round_parts):
    _, _, coordinator, _, upload, aggregator = round_parts
    agg = aggregator()
    agg.receive(upload(0).encode(), from_site=0)
    with pytest.raises(ProtocolAbort, match="needs 2"):
        agg.finish(coordinator.add)


def test_uploads_round_trip_and_refuse_truncation(round_parts):
    _, _, _, _, upload, _ = round_parts
    data = upload(0).encode()
    decoded = EncryptedUpload.decode(data)
    assert decoded.encode() == data
    for cut in (0, 10, 60, len(data) - 1):
        with pytest.raises(MalformedMessageError):
            EncryptedUpload.decode(data[:cut])


@pytest.mark.parametrize("kwargs, expected", [
    ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 60)}, "128-bit"),
    ({"poly_modulus_degree": 3000}, "poly_modulus_degree"),
    ({"scale_bits": 58}, "lower scale_bits"),
    ({"max_sites": 0, "clip": -1.0}, "max_sites"),
])
def test_unsafe_or_overflowing_parameters_are_refused(kwargs, expected):
    with pytest.raises(ConfigError, match=expected):
        HEConfig(**kwargs)
