"""Seeded symmetric CKKS uploads: half the bytes, the same sums, and every ciphertext a sum cannot
use refused (tampered, foreign, or crafted to pass SEAL's own checks) without a crash."""

from __future__ import annotations

import dataclasses
import gc
import os
import stat
import threading

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sa

from securefed.errors import MalformedMessageError
from securefed.he.aggregator import HEAggregator
from securefed.he.config import HEConfig
from securefed.he.keys import context_digest
from securefed.he.messages import EncryptedUpload
from securefed.he.tenseal_ckks import CKKSCodec, new_context
from securefed.primitives.identity import SiteIdentity
from securefed.primitives.roster import Roster

CONFIG = HEConfig()
SLOTS = CONFIG.slots
# A 10-site sum of values up to 1 at scale 2^50 comes back within ~1e-11; 1e-9 still fails a sum
# that lost one low bit of the scale or one site's term.
TOLERANCE = 1e-9
# Three primes give ciphertexts a second level to be moved to.
DEEP = HEConfig(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40), scale_bits=40)


@pytest.fixture(scope="module")
def keys():
    secret, public = new_context(CONFIG)
    return secret, public, CKKSCodec(CONFIG, secret), CKKSCodec(CONFIG, public)


def _seal_load(seal_context, data: bytes, folder) -> sa.Ciphertext:
    path = str(folder / "ciphertext")
    with open(path, "wb") as file:
        file.write(data)
    loaded = sa.Ciphertext()
    loaded.load(seal_context, path)  # SEAL's own checks only
    return loaded


def _seal_save(ciphertext: sa.Ciphertext, folder) -> bytes:
    path = str(folder / "crafted")
    ciphertext.save(path)
    with open(path, "rb") as file:
        return file.read()


def _refused_everywhere(bad: bytes, good: bytes, site: CKKSCodec, coordinator: CKKSCodec) -> None:
    with pytest.raises(MalformedMessageError):
        coordinator.load(bad)
    with pytest.raises(MalformedMessageError):
        coordinator.add([[good], [bad]])
    with pytest.raises(MalformedMessageError):
        site.decrypt([bad], length=1)


def test_a_seeded_upload_is_half_the_bytes_of_an_unseeded_ciphertext(keys):
    secret, _, site, coordinator = keys
    values = np.random.default_rng(0).normal(0, 0.05, 3 * SLOTS)
    ours = site.encrypt(values)
    context = ts.context_from(secret)
    context.global_scale = CONFIG.scale
    unseeded = [ts.ckks_vector(context, values[i:i + SLOTS].tolist()).serialize() for i in range(0, values.size, SLOTS)]
    assert len(ours) == len(unseeded) == 3
    ratio = sum(map(len, ours)) / sum(map(len, unseeded))
    assert 0.45 < ratio < 0.55, f"seeded / unseeded bytes = {ratio:.3f}"
    summed = coordinator.add([ours, ours])  # a sum is a full ciphertext again
    assert 0.9 < sum(map(len, summed)) / sum(map(len, unseeded)) < 1.1


def test_seeded_uploads_round_trip_and_sum_within_the_ckks_error(keys):
    _, _, site, coordinator = keys
    rng = np.random.default_rng(1)
    vectors = rng.normal(0, 0.2, (10, 2 * SLOTS + 77))
    vectors[3, :5] = [1.5, -4.0, 1.0, -1.0, 0.0]  # clipped to [-1, 1] before encrypting
    weights = rng.uniform(0, 1, 10)
    uploads = []
    for i, (row, weight) in enumerate(zip(vectors, weights)):
        row = row.astype(np.float32) if i % 2 else row  # a float32 update goes in as it is
        uploads.append(site.encrypt(row, weight=float(weight), append_weight=True))
        np.testing.assert_allclose(site.decrypt(uploads[-1], length=row.size + 1)[:-1],
                                   weight * np.clip(row.astype(np.float64), -1, 1), rtol=0, atol=TOLERANCE)
    length = vectors.shape[1] + 1
    total = site.decrypt(coordinator.add(uploads), length=length)
    clipped = np.clip([row.astype(np.float32) if i % 2 else row for i, row in enumerate(vectors)], -1, 1)
    expected = (weights[:, None] * clipped).sum(axis=0)
    assert np.abs(total[:-1] - expected).max() < TOLERANCE
    assert abs(total[-1] - weights.sum()) < TOLERANCE


@pytest.mark.parametrize("tamper", ["empty", "header only", "cut in half", "one byte short", "one byte appended",
                                    "magic changed", "size field changed", "random body", "random bytes"])
def test_tampered_bytes_are_refused(keys, tamper):
    _, _, site, coordinator = keys
    good = site.encrypt(np.full(10, 0.3))[0]
    rng = np.random.default_rng(2)
    bad = {
        "empty": b"",
        "header only": good[:16],
        "cut in half": good[:len(good) // 2],
        "one byte short": good[:-1],
        "one byte appended": good + b"\x00",
        "magic changed": b"\x5f" + good[1:],
        "size field changed": good[:8] + (len(good) - 8).to_bytes(8, "little") + good[16:len(good) - 8],
        "random body": good[:16] + rng.bytes(len(good) - 16),
        "random bytes": rng.bytes(len(good)),
    }[tamper]
    _refused_everywhere(bad, good, site, coordinator)


def test_ciphertexts_of_other_parameters_are_refused(keys):
    _, _, site, coordinator = keys
    good = site.encrypt(np.full(10, 0.3))[0]
    for config in (DEEP, HEConfig(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 49)),
                   HEConfig(coeff_mod_bit_sizes=(50, 50), scale_bits=40)):
        other_secret, _ = new_context(config)
        foreign = CKKSCodec(config, other_secret).encrypt(np.full(10, 0.3))[0]
        _refused_everywhere(foreign, good, site, coordinator)
    with pytest.raises(MalformedMessageError, match="ring degree"):
        CKKSCodec(DEEP, new_context(CONFIG)[0])  # a context that is not the config's


def test_random_mutations_are_refused_or_load_as_a_usable_ciphertext_never_a_crash(keys):
    _, _, site, coordinator = keys
    upload = site.encrypt(np.full(10, 0.3))[0]
    summed = coordinator.add([[upload], [upload]])[0]
    rng = np.random.default_rng(3)
    refused = 0
    for trial in range(400):
        data = bytearray(upload if trial % 2 else summed)
        for _ in range(int(rng.integers(1, 4))):
            position = int(rng.integers(0, 120 if trial % 3 == 0 else len(data)))  # often the header and metadata
            data[position] ^= 1 << int(rng.integers(0, 8))
        try:
            loaded = coordinator.load(bytes(data))
        except MalformedMessageError:
            refused += 1
            continue
        # accepted: a ciphertext's coefficients are malleable (the signature protects them), but
        # what loads must still be one a sum can use
        assert loaded.size() == 2 and loaded.scale == CONFIG.scale and loaded.is_ntt_form()
    assert refused > 40


def test_a_crafted_scale_that_seal_accepts_is_refused(keys, tmp_path):
    secret, _, site, coordinator = keys
    good = site.encrypt(np.full(10, 0.3))[0]
    context = ts.context_from(secret)
    seal_context = context.seal_context().data
    decryptor, encoder = sa.Decryptor(seal_context, context.secret_key().data), sa.CKKSEncoder(seal_context)
    for scale in (CONFIG.scale * 2, CONFIG.scale / 4, np.nextafter(CONFIG.scale, np.inf)):
        crafted = _seal_load(seal_context, good, tmp_path)
        crafted.scale = float(scale)
        data = _seal_save(crafted, tmp_path)
        reloaded = _seal_load(seal_context, data, tmp_path)  # the attack's premise: SEAL loads it...
        plaintext = sa.Plaintext()
        decryptor.decrypt(reloaded, plaintext)
        decoded = encoder.decode_double(plaintext)[0]
        assert decoded == pytest.approx(0.3 * CONFIG.scale / scale, rel=1e-9)  # ...and it silently rescales
        with pytest.raises(MalformedMessageError, match="scale"):
            coordinator.load(data)
        _refused_everywhere(data, good, site, coordinator)


def test_three_polynomials_or_another_level_are_refused(tmp_path):
    secret, public = new_context(DEEP)
    site, coordinator = CKKSCodec(DEEP, secret), CKKSCodec(DEEP, public)
    good = site.encrypt(np.full(10, 0.3))[0]
    seal_context = ts.context_from(public).seal_context().data
    bigger = _seal_load(seal_context, good, tmp_path)
    bigger.resize(seal_context, 3)
    lower = _seal_load(seal_context, good, tmp_path)
    sa.Evaluator(seal_context).mod_switch_to_next_inplace(lower)
    for crafted, reason in ((bigger, "3 polynomials"), (lower, "level")):
        data = _seal_save(crafted, tmp_path)
        _seal_load(seal_context, data, tmp_path)  # SEAL accepts both
        with pytest.raises(MalformedMessageError, match=reason):
            coordinator.load(data)
        _refused_everywhere(data, good, site, coordinator)


def test_a_site_sending_a_crafted_scale_is_left_out_and_the_honest_ones_still_sum(keys, tmp_path):
    secret, public, site, coordinator = keys
    identities = [SiteIdentity.generate(f"s{i}") for i in range(4)]
    roster = Roster([i.public() for i in identities])
    digest = context_digest(public)
    values = np.random.default_rng(4).normal(0, 0.1, (4, 50))
    seal_context = ts.context_from(public).seal_context().data
    aggregator = HEAggregator(roster=roster, round_id=1, participants=range(4), context_digest=digest, length=51,
                              ciphertexts=1, minimum=2)
    for i in range(4):
        ciphertexts = site.encrypt(values[i], append_weight=True)
        if i == 1:  # signed by its sender, so only the codec can tell
            crafted = _seal_load(seal_context, ciphertexts[0], tmp_path)
            crafted.scale = CONFIG.scale * 2
            ciphertexts = [_seal_save(crafted, tmp_path)]
        upload = EncryptedUpload(1, i, digest, 51, tuple(ciphertexts))
        upload = dataclasses.replace(upload, signature=identities[i].sign(upload.statement()))
        aggregator.receive(upload.encode(), from_site=i)
    total = aggregator.finish(coordinator.add)
    assert total.survivors == {0, 2, 3} and set(total.rejected) == {1}
    summed = site.decrypt(total.ciphertexts, length=51)
    np.testing.assert_allclose(summed[:-1], values[[0, 2, 3]].sum(axis=0), rtol=0, atol=TOLERANCE)


def _folder(codec: CKKSCodec) -> str:
    folder = codec._scratch.folder
    assert folder is not None and os.path.isdir(folder)
    return folder


def test_the_scratch_folder_is_private_reused_and_removed(keys):
    secret, _, _, _ = keys
    codec = CKKSCodec(CONFIG, secret)
    for _ in range(30):
        codec.decrypt(codec.encrypt(np.full(SLOTS + 1, 0.1)), length=SLOTS + 1)
    folder = _folder(codec)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and os.listdir(folder) == ["object"]
    codec.close()
    assert not os.path.exists(folder)
    with codec:  # usable after close: a new folder, gone when the block ends
        codec.encrypt(np.zeros(3))
        again = _folder(codec)
    assert again != folder and not os.path.exists(again)
    codec.encrypt(np.zeros(3))
    collected = _folder(codec)
    del codec
    gc.collect()
    assert not os.path.exists(collected)


def test_a_forked_child_never_removes_its_parents_folder(keys):
    secret, _, _, _ = keys
    codec = CKKSCodec(CONFIG, secret)
    codec.encrypt(np.zeros(3))
    folder = _folder(codec)
    pid = os.fork()
    if pid == 0:  # the child closes its copy of the codec and leaves
        try:
            codec.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.isdir(folder)
    codec.close()


def test_threads_sharing_a_codec_get_their_own_values_back(keys):
    _, _, site, _ = keys
    results: dict[int, float] = {}

    def work(k: int) -> None:
        out = [site.decrypt(site.encrypt(np.full(SLOTS, k / 10)), length=SLOTS) for _ in range(5)]
        results[k] = max(np.abs(o - k / 10).max() for o in out)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 1, 2, 3] and max(results.values()) < TOLERANCE


def test_no_secret_in_the_codecs_repr(keys):
    secret, _, site, _ = keys
    for text in (repr(site), str(site), repr(site._scratch)):
        assert len(text) < 200 and "secret key held" in repr(site)
        assert not any(secret[i:i + 8].hex() in text for i in range(0, len(secret) - 8, 8))
