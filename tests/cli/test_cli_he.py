"""``securefed he keygen|open|rotate|show``: the dealer's keyset, and the attacks a site must refuse."""

from __future__ import annotations

import json
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from securefed.cli import main
from securefed.errors import DecryptionError, MalformedMessageError
from securefed.he.config import HEConfig
from securefed.he.keys import SealedContext, context_digest
from securefed.he.tenseal_ckks import CKKSCodec
from securefed.primitives.identity import PublicIdentity, SiteIdentity
from securefed.primitives.roster import Roster

SITES = ("admin", "north", "south")


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    """Three identities (admin is the dealer) and their roster, as files in ``tmp_path``."""
    identities = [SiteIdentity.generate(name) for name in SITES]
    for identity in identities:
        identity.save(tmp_path / f"{identity.name}.key")
    Roster(i.public() for i in identities).save(tmp_path / "roster.json")
    return tmp_path


def he(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["he", *args])
    out, err = capsys.readouterr()
    return code, out, err


def keygen(capsys, fed: Path, out: str = "keyset", *extra: str) -> tuple[int, str, str]:
    return he(capsys, "keygen", "--roster", str(fed / "roster.json"), "--dealer", str(fed / "admin.key"),
              "--out", str(fed / out), *extra)


def open_as(capsys, fed: Path, site: str, keyset: str = "keyset", roster: str = "roster.json",
            *extra: str) -> tuple[int, str, str]:
    return he(capsys, "open", "--keyset", str(fed / keyset), "--site-identity", str(fed / f"{site}.key"),
              "--roster", str(fed / roster), "--out", str(fed / f"{site}-{keyset}.ctx"), *extra)


def refused(result: tuple[int, str, str], *words: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one clear line
    for word in words:
        assert word in err, err


def secret_slices(secret: bytes) -> list[bytes]:
    """48-byte pieces from across the secret context's key material (its first bytes are the
    parameters, which the public context rightly shares)."""
    return [secret[i:i + 48] for i in range(256, len(secret) - 48, (len(secret) - 256) // 16)]


def test_each_site_opens_the_same_key_and_the_coordinator_cannot_decrypt(capsys, fed: Path) -> None:
    code, out, err = keygen(capsys, fed)
    assert code == 0, err
    keyset = fed / "keyset"
    assert stat.S_IMODE(keyset.stat().st_mode) == 0o700
    document = json.loads((keyset / "keyset.json").read_text())
    assert document["sites"] == list(SITES) and document["dealer"] == "admin"
    assert len(bytes.fromhex(document["run_id"])) == 16 and document["run_id"] in out
    config = HEConfig(**document["parameters"])
    assert config == HEConfig()
    secrets = {}
    for site in SITES:
        # The run id and dealer announced over another channel, pinned.
        code, out, err = open_as(capsys, fed, site, "keyset", "roster.json", "--run-id", document["run_id"],
                                 "--dealer", "admin")
        assert code == 0, err
        path = fed / f"{site}-keyset.ctx"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        secrets[site] = path.read_bytes()
        assert context_digest(secrets[site]).hex() == document["secret_context_sha256"]
    north, south = CKKSCodec(config, secrets["north"]), CKKSCodec(config, secrets["south"])
    x, y = np.linspace(-1, 1, 3000), np.linspace(0.5, -0.25, 3000)
    coordinator = CKKSCodec(config, (keyset / "public-context.bin").read_bytes())
    assert not coordinator.holds_secret_key
    total = coordinator.add([north.encrypt(x), south.encrypt(y)])  # the coordinator adds, blind
    with pytest.raises(DecryptionError):
        coordinator.decrypt(total, length=x.size)
    assert np.allclose(south.decrypt(north.encrypt(x), length=x.size), x, atol=1e-6)
    assert np.allclose(CKKSCodec(config, secrets["admin"]).decrypt(total, length=x.size), x + y, atol=1e-6)


def test_no_file_of_the_keyset_and_nothing_printed_holds_the_secret_key(capsys, fed: Path) -> None:
    code, printed, _ = keygen(capsys, fed)
    assert code == 0
    for command in (["show", "--keyset", str(fed / "keyset")], ["show", "--keyset", str(fed / "keyset"), "--json"]):
        code, out, _ = he(capsys, *command)
        assert code == 0
        printed += out
    code, out, _ = open_as(capsys, fed, "north")
    printed += out
    secret = (fed / "north-keyset.ctx").read_bytes()
    files = [p for p in (fed / "keyset").rglob("*") if p.is_file()]
    assert len(files) == 2 + len(SITES)
    config = HEConfig()
    for path in files:
        data = path.read_bytes()
        for piece in secret_slices(secret):
            assert piece not in data, path
            assert piece.hex()[:32] not in printed
        try:
            loaded = CKKSCodec(config, data)
        except MalformedMessageError:
            continue  # not a context at all
        assert not loaded.holds_secret_key, path


def test_a_delivery_for_another_site_is_refused(capsys, fed: Path) -> None:
    assert keygen(capsys, fed)[0] == 0
    sealed = fed / "keyset" / "sealed"
    shutil.copy(sealed / "north.bin", sealed / "south.bin")  # the coordinator hands south north's box
    refused(open_as(capsys, fed, "south"), "refused", "north")
    assert not (fed / "south-keyset.ctx").exists()


@pytest.mark.parametrize("where", ["run id", "sealed box", "signature"])
def test_a_delivery_altered_by_one_byte_is_refused(capsys, fed: Path, where: str) -> None:
    assert keygen(capsys, fed)[0] == 0
    path = fed / "keyset" / "sealed" / "north.bin"
    data = bytearray(path.read_bytes())
    offset = {"run id": 6, "sealed box": len(data) // 2, "signature": len(data) - 1}[where]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    refused(open_as(capsys, fed, "north"), "is refused")
    assert not (fed / "north-keyset.ctx").exists()


def test_a_key_from_another_roster_member_posing_as_dealer_is_refused(capsys, fed: Path) -> None:
    assert keygen(capsys, fed)[0] == 0
    south = SiteIdentity.load(fed / "south.key")
    path = fed / "keyset" / "sealed" / "north.bin"
    delivery = SealedContext.decode(path.read_bytes())
    # South re-signs the dealer's statement with its own key, still naming the dealer admin.
    forged = replace(delivery, signature=south.sign(delivery.statement()))
    path.write_bytes(forged.encode())
    refused(open_as(capsys, fed, "north"), "InvalidSignatureError", "admin")
    # South names itself the dealer in keyset.json and signs as itself: refused against the agreed dealer.
    keyset_file = fed / "keyset" / "keyset.json"
    document = json.loads(keyset_file.read_text())
    keyset_file.write_text(json.dumps({**document, "dealer": "south"}))
    resigned = replace(delivery, dealer="south", signature=b"")
    path.write_bytes(replace(resigned, signature=south.sign(resigned.statement())).encode())
    refused(open_as(capsys, fed, "north", "keyset", "roster.json", "--dealer", "admin"), "announced dealer")


def test_a_dealer_outside_the_roster_is_refused(capsys, fed: Path) -> None:
    outsider = SiteIdentity.generate("outsider")
    outsider.save(fed / "outsider.key")
    refused(he(capsys, "keygen", "--roster", str(fed / "roster.json"), "--dealer", str(fed / "outsider.key"),
               "--out", str(fed / "rogue")), "not in the roster")
    assert not (fed / "rogue").exists()
    # A site whose roster lacks the keyset's dealer refuses the delivery.
    assert keygen(capsys, fed)[0] == 0
    roster = Roster.load(fed / "roster.json")
    Roster(roster[n] for n in ("north", "south")).save(fed / "sites-only.json")
    refused(open_as(capsys, fed, "north", "keyset", "sites-only.json"), "refused", "admin")
    assert not (fed / "north-keyset.ctx").exists()


def test_a_roster_name_that_escapes_the_keyset_folder_is_refused(capsys, fed: Path) -> None:
    roster = Roster.load(fed / "roster.json")
    evil = PublicIdentity(name="../../evil", verify_key=bytes(range(32)), encryption_key=bytes(range(1, 33)))
    Roster([*roster.identities, evil]).save(fed / "evil-roster.json")
    refused(he(capsys, "keygen", "--roster", str(fed / "evil-roster.json"), "--dealer", str(fed / "admin.key"),
               "--out", str(fed / "keyset")), "../../evil")
    assert not (fed / "keyset").exists() and not list(fed.rglob("evil.bin"))


def test_rotate_makes_a_new_key_and_run_and_refuses_an_old_delivery(capsys, fed: Path) -> None:
    assert keygen(capsys, fed, "keyset", "--max-sites", "10", "--scale-bits", "40")[0] == 0
    old = json.loads((fed / "keyset" / "keyset.json").read_text())
    code, out, err = he(capsys, "rotate", "--keyset", str(fed / "keyset"), "--dealer", str(fed / "admin.key"),
                        "--roster", str(fed / "roster.json"), "--out", str(fed / "next"))
    assert code == 0, err
    assert "deletes its old secret context" in out and "replaces its public context" in out
    new = json.loads((fed / "next" / "keyset.json").read_text())
    assert new["parameters"] == old["parameters"] and new["parameters"]["max_sites"] == 10
    assert new["run_id"] != old["run_id"] and new["secret_context_sha256"] != old["secret_context_sha256"]
    assert open_as(capsys, fed, "north", "keyset")[0] == 0
    assert open_as(capsys, fed, "north", "next")[0] == 0
    config = HEConfig(**new["parameters"])
    old_key = CKKSCodec(config, (fed / "north-keyset.ctx").read_bytes())
    new_key = CKKSCodec(config, (fed / "north-next.ctx").read_bytes())
    x = np.linspace(-1, 1, 100)
    assert np.allclose(old_key.decrypt(old_key.encrypt(x), length=100), x, atol=1e-4)
    assert not np.allclose(new_key.decrypt(old_key.encrypt(x), length=100), x, atol=1e-1)
    # Last run's delivery slipped into the new keyset: refused as another run's key.
    shutil.copy(fed / "keyset" / "sealed" / "south.bin", fed / "next" / "sealed" / "south.bin")
    refused(open_as(capsys, fed, "south", "next"), "ProtocolAbort", "earlier run")
    refused(open_as(capsys, fed, "admin", "next", "roster.json", "--run-id", old["run_id"]), "announced run")
    assert not (fed / "admin-next.ctx").exists()


@pytest.mark.parametrize("target", ["keyset", "keyset/", "keyset/inner"])
def test_rotate_refuses_to_write_into_the_old_keyset(capsys, fed: Path, target: str) -> None:
    assert keygen(capsys, fed)[0] == 0
    before = sorted(p.name for p in (fed / "keyset").rglob("*"))
    refused(he(capsys, "rotate", "--keyset", str(fed / "keyset"), "--dealer", str(fed / "admin.key"),
               "--roster", str(fed / "roster.json"), "--out", str(fed / target)), "old keyset")
    assert sorted(p.name for p in (fed / "keyset").rglob("*")) == before


def test_keygen_refuses_a_non_empty_folder(capsys, fed: Path) -> None:
    (fed / "busy").mkdir()
    (fed / "busy" / "notes.txt").write_text("keep me")
    refused(keygen(capsys, fed, "busy"), "not empty")
    assert [p.name for p in (fed / "busy").iterdir()] == ["notes.txt"]


def test_keygen_refuses_parameters_below_128_bits_naming_every_problem(capsys, fed: Path) -> None:
    code, _, err = keygen(capsys, fed, "weak", "--coeff-mod-bit-sizes", "60,60", "--scale-bits", "70")
    assert code == 2 and "Traceback" not in err
    assert "--coeff-mod-bit-sizes sum to 120 bits, above the 109 bits" in err and "128-bit" in err
    assert "--scale-bits" in err and "70" in err
    refused(keygen(capsys, fed, "weak", "--coeff-mod-bit-sizes", "60,x"), "--coeff-mod-bit-sizes", "60,49")
    refused(keygen(capsys, fed, "weak", "--max-sites", "2"), "--max-sites 3", "3 sites")
    assert not (fed / "weak").exists()


def test_show_prints_public_facts_and_detects_a_swapped_public_context(capsys, fed: Path) -> None:
    assert keygen(capsys, fed)[0] == 0
    document = json.loads((fed / "keyset" / "keyset.json").read_text())
    code, out, err = he(capsys, "show", "--keyset", str(fed / "keyset"), "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["security_level"] == "128-bit (HE standard)"
    for key in ("run_id", "dealer", "parameters", "public_context_sha256", "secret_context_sha256", "sites"):
        assert shown[key] == document[key]
    assert shown["missing_deliveries"] == []
    (fed / "keyset" / "public-context.bin").write_bytes(b"\x00" * 86)
    refused(he(capsys, "show", "--keyset", str(fed / "keyset")), "does not match")
    refused(open_as(capsys, fed, "north"), "does not match")


def test_open_never_overwrites_a_secret_file(capsys, fed: Path) -> None:
    assert keygen(capsys, fed)[0] == 0
    (fed / "north-keyset.ctx").write_bytes(b"earlier run")
    refused(open_as(capsys, fed, "north"), "already exists")
    assert (fed / "north-keyset.ctx").read_bytes() == b"earlier run"
