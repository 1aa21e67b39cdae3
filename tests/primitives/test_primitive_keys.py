"""Tests for site identities, the roster and X25519 agreement (securefed.primitives.keys)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from securefed.errors import ConfigError, CryptoError, InvalidSignatureError
from securefed.primitives.keys import (
    AgreementKeyPair,
    PublicIdentity,
    Roster,
    SiteIdentity,
    agree,
)
from securefed.primitives.randomness import SeededRandom

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def _sites(n: int, seed: str = "roster") -> list[SiteIdentity]:
    rng = SeededRandom(seed)
    return [SiteIdentity.generate(f"hospital-{i}", rng.fork(str(i))) for i in range(n)]


def test_generate_is_reproducible_from_rng_and_random_otherwise() -> None:
    a = SiteIdentity.generate("a", SeededRandom(1)).public()
    assert a == SiteIdentity.generate("a", SeededRandom(1)).public()
    assert a != SiteIdentity.generate("a", SeededRandom(2)).public()
    assert SiteIdentity.generate("a").public() != SiteIdentity.generate("a").public()
    assert a.verify_key != a.encryption_key


def test_sign_and_verify() -> None:
    site = SiteIdentity.generate("clinic", SeededRandom(3))
    public = site.public()
    signature = site.sign(b"round 7 masked update")
    assert len(signature) == 64
    public.verify(b"round 7 masked update", signature)
    with pytest.raises(InvalidSignatureError, match="clinic") as info:
        public.verify(b"round 8 masked update", signature)
    assert signature.hex() not in str(info.value)
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(InvalidSignatureError):
        public.verify(b"round 7 masked update", tampered)
    with pytest.raises(InvalidSignatureError):
        public.verify(b"round 7 masked update", signature[:63])
    other = SiteIdentity.generate("other", SeededRandom(4)).public()
    with pytest.raises(InvalidSignatureError):
        other.verify(b"round 7 masked update", signature)


def test_repr_hides_secrets() -> None:
    site = SiteIdentity.generate("clinic", SeededRandom(5))
    text = repr(site)
    assert site.encryption_secret.hex() not in text
    assert site.encryption_secret.hex()[:8] not in text
    pair = AgreementKeyPair.generate(SeededRandom(6))
    assert pair.secret.hex() not in repr(pair) and str(pair.secret) not in repr(pair)


@posix_only
def test_save_load_round_trip_with_private_mode(tmp_path: Path) -> None:
    site = SiteIdentity.generate("clinic", SeededRandom(7))
    path = tmp_path / "clinic.key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file mode
    try:
        site.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = SiteIdentity.load(path)
    assert loaded.public() == site.public()
    assert loaded.name == "clinic"
    assert loaded.sign(b"m") == site.sign(b"m")  # Ed25519 is deterministic
    document = json.loads(path.read_text())
    assert document["format"] == "securefed-site-identity" and document["version"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "clinic.key"
    first = SiteIdentity.generate("clinic", SeededRandom(8))
    second = SiteIdentity.generate("clinic", SeededRandom(9))
    first.save(path)
    with pytest.raises(ConfigError, match="overwrite=True"):
        second.save(path)
    assert SiteIdentity.load(path).public() == first.public()
    second.save(path, overwrite=True)
    assert SiteIdentity.load(path).public() == second.public()


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_readable_key_file(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "clinic.key"
    site = SiteIdentity.generate("clinic", SeededRandom(10))
    site.save(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        SiteIdentity.load(path)
    assert site.encryption_secret.hex() not in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"format": "something-else", "version": 1}),
        json.dumps({"format": "securefed-site-identity", "version": 99}),
        json.dumps(
            {
                "format": "securefed-site-identity",
                "version": 1,
                "name": "x",
                "signing_seed": "00" * 31,
                "encryption_secret": "00" * 32,
            }
        ),
        json.dumps(
            {
                "format": "securefed-site-identity",
                "version": 1,
                "name": "",
                "signing_seed": "00" * 32,
                "encryption_secret": "zz" * 32,
            }
        ),
    ],
)
def test_load_rejects_foreign_or_corrupt_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    with pytest.raises(ConfigError):
        SiteIdentity.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        SiteIdentity.load(tmp_path / "absent.key")


def test_public_identity_validation_and_dict_round_trip() -> None:
    public = SiteIdentity.generate("clinic", SeededRandom(11)).public()
    assert PublicIdentity.from_dict(public.to_dict()) == public
    as_base64 = {
        "name": "clinic",
        "verify_key": base64.b64encode(public.verify_key).decode(),
        "encryption_key": base64.b64encode(public.encryption_key).decode(),
    }
    assert PublicIdentity.from_dict(as_base64) == public
    with pytest.raises(ConfigError) as info:
        PublicIdentity(name="", verify_key=b"short", encryption_key=bytes(33))
    assert len(info.value.problems) == 3
    for bad_name in ("x" * 129, "tab\there", " padded", "new\nline"):
        with pytest.raises(ConfigError):
            PublicIdentity(name=bad_name, verify_key=bytes(32), encryption_key=bytes(32))
    PublicIdentity(name="x" * 128, verify_key=bytes(32), encryption_key=bytes(32))
    with pytest.raises(ConfigError):
        PublicIdentity.from_dict(
            {"name": "a", "verify_key": "nothex!", "encryption_key": "00" * 32}
        )


def test_roster_mapping_behaviour_and_round_trip(tmp_path: Path) -> None:
    sites = _sites(4)
    roster = Roster(site.public() for site in sites)
    assert roster.names == tuple(f"hospital-{i}" for i in range(4))
    assert len(roster) == 4 and list(roster) == list(roster.names)
    assert "hospital-2" in roster and "nobody" not in roster
    assert roster.index("hospital-3") == 3
    assert roster["hospital-1"] == sites[1].public()
    with pytest.raises(KeyError):
        roster["nobody"]
    with pytest.raises(KeyError):
        roster.index("nobody")
    again = Roster.from_json(roster.to_json())
    assert again == roster and again.digest() == roster.digest()
    path = tmp_path / "roster.json"
    roster.save(path)
    assert Roster.load(path) == roster
    with pytest.raises(ConfigError):
        roster.save(path)


def test_roster_digest_depends_on_order_and_content() -> None:
    publics = [site.public() for site in _sites(3)]
    digest = Roster(publics).digest()
    assert len(digest) == 32
    assert Roster(list(reversed(publics))).digest() != digest
    assert Roster(publics[:2]).digest() != digest
    renamed = PublicIdentity("renamed", publics[2].verify_key, publics[2].encryption_key)
    assert Roster(publics[:2] + [renamed]).digest() != digest


def test_roster_rejects_duplicates_listing_every_problem() -> None:
    publics = [site.public() for site in _sites(3)]
    same_name = PublicIdentity("hospital-0", publics[1].verify_key, bytes(range(32)))
    same_keys = PublicIdentity("copy", publics[2].verify_key, publics[2].encryption_key)
    with pytest.raises(ConfigError) as info:
        Roster([publics[0], publics[1], publics[2], same_name, same_keys])
    problems = info.value.problems
    assert len(problems) == 4  # name, verify key twice (two groups), encryption key
    assert any("hospital-0" in p and "2 times" in p for p in problems)
    with pytest.raises(ConfigError):
        Roster([])


def test_roster_from_bad_json() -> None:
    for text in ("[]", "{", json.dumps({"format": "securefed-roster", "version": 2, "sites": []})):
        with pytest.raises(ConfigError):
            Roster.from_json(text)
    bad = {"format": "securefed-roster", "version": 1, "sites": [{"name": "a"}, {"name": ""}]}
    with pytest.raises(ConfigError) as info:
        Roster.from_json(json.dumps(bad))
    assert len(info.value.problems) == 2


def test_agreement_is_symmetric_and_keyed() -> None:
    rng = SeededRandom(12)
    alice, bob, carol = (AgreementKeyPair.generate(rng) for _ in range(3))
    shared = alice.agree(bob.public)
    assert len(shared) == 32
    assert shared == bob.agree(alice.public) == agree(alice.secret, bob.public)
    assert shared != alice.agree(carol.public)
    assert AgreementKeyPair.from_secret(alice.secret) == alice
    site_a = SiteIdentity.generate("a", rng)
    site_b = SiteIdentity.generate("b", rng)
    assert site_a.agree(site_b.public().encryption_key) == site_b.agree(
        site_a.public().encryption_key
    )


def test_agreement_rejects_bad_peer_keys() -> None:
    pair = AgreementKeyPair.generate(SeededRandom(13))
    for bad in (bytes(31), bytes(33), b""):
        with pytest.raises(CryptoError):
            pair.agree(bad)
    # Low-order points of Curve25519: the zero point and the point of order 1 (u = 1).
    for low_order in (bytes(32), (1).to_bytes(32, "little")):
        with pytest.raises(CryptoError, match="low-order"):
            pair.agree(low_order)
    with pytest.raises(CryptoError):
        AgreementKeyPair(secret=pair.secret, public=bytes(32))


@posix_only
def test_roster_file_mode_is_public(tmp_path: Path) -> None:
    path = Roster(site.public() for site in _sites(2)).save(tmp_path / "r.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_corrupt_identity_error_does_not_echo_secrets(tmp_path: Path) -> None:
    good = SiteIdentity.generate("clinic", SeededRandom(14))
    path = tmp_path / "clinic.key"
    good.save(path)
    document = json.loads(path.read_text())
    seed_hex = document["signing_seed"]
    document["encryption_secret"] = document["encryption_secret"][:-2]  # truncate
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="encryption_secret") as info:
        SiteIdentity.load(path)
    assert seed_hex not in str(info.value)
    assert document["encryption_secret"] not in str(info.value)
