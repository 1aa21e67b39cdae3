"""``securefed keys create|roster|show``, run as a subprocess the way a site's operator runs it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from securefed.primitives.identity import PublicIdentity, SiteIdentity
from securefed.primitives.roster import Roster


def securefed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "securefed", *args], capture_output=True, text=True, timeout=120)


def secrets_of(private_file: Path) -> list[str]:
    """The private key material in a key file, as hex and as it could be printed."""
    document = json.loads(private_file.read_text())
    return [document["signing_seed"], document["encryption_secret"]]


def assert_no_secrets(proc: subprocess.CompletedProcess[str], *private_files: Path) -> None:
    output = (proc.stdout + proc.stderr).lower()
    for private_file in private_files:
        for secret in secrets_of(private_file):
            assert secret.lower() not in output
            assert secret[:16].lower() not in output  # not even a prefix


def create(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return securefed("keys", "create", name, "--out", str(out), *extra)


def test_create_writes_a_private_file_0600_and_a_public_identity(tmp_path: Path) -> None:
    out = tmp_path / "keys"  # created by the command
    proc = create("st-thomas", out)
    assert proc.returncode == 0, proc.stderr
    private, public = out / "st-thomas.key", out / "st-thomas.public.json"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    identity = SiteIdentity.load(private)
    assert identity.name == "st-thomas"
    assert PublicIdentity.from_dict(json.loads(public.read_text())) == identity.public()
    assert_no_secrets(proc, private)
    assert str(private) in proc.stdout and str(public) in proc.stdout


def test_create_refuses_existing_files_without_force(tmp_path: Path) -> None:
    assert create("leeds", tmp_path).returncode == 0
    before = (tmp_path / "leeds.key").read_bytes()
    proc = create("leeds", tmp_path)
    assert proc.returncode == 2
    assert "already exist" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "leeds.key").read_bytes() == before
    proc = create("leeds", tmp_path, "--force")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "leeds.key").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "leeds.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["st thomas", "../evil", ".hidden"])
def test_create_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    proc = create(name, tmp_path / "out")
    assert proc.returncode == 2
    assert "site name" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.parent.glob("evil*"))


def test_roster_from_public_identities_loads_in_the_given_order(tmp_path: Path) -> None:
    for name in ("north", "south", "east"):
        assert create(name, tmp_path).returncode == 0
    publics = [str(tmp_path / f"{n}.public.json") for n in ("south", "north", "east")]
    roster_file = tmp_path / "roster.json"
    proc = securefed("keys", "roster", *publics, "--out", str(roster_file))
    assert proc.returncode == 0, proc.stderr
    roster = Roster.load(roster_file)
    assert roster.names == ("south", "north", "east")
    assert roster["north"] == SiteIdentity.load(tmp_path / "north.key").public()
    assert roster.digest().hex() in proc.stdout
    # An existing roster is kept unless --force.
    proc = securefed("keys", "roster", publics[0], publics[1], "--out", str(roster_file))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert Roster.load(roster_file).names == ("south", "north", "east")
    proc = securefed("keys", "roster", publics[0], publics[1], "--out", str(roster_file), "--force")
    assert proc.returncode == 0 and Roster.load(roster_file).names == ("south", "north")


def test_roster_refuses_duplicates_private_files_and_garbage(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert create("same", tmp_path / "a").returncode == 0
    assert create("same", tmp_path / "b").returncode == 0
    out = tmp_path / "roster.json"
    proc = securefed("keys", "roster", str(tmp_path / "a" / "same.public.json"),
                     str(tmp_path / "b" / "same.public.json"), "--out", str(out))
    assert proc.returncode == 2 and "'same' appears 2 times" in proc.stderr
    assert not out.exists()
    private = tmp_path / "a" / "same.key"
    (tmp_path / "junk.json").write_text("{not json")
    proc = securefed("keys", "roster", str(private), str(tmp_path / "junk.json"), str(tmp_path / "gone.json"),
                     "--out", str(out))
    assert proc.returncode == 2 and not out.exists()
    assert "PRIVATE identity file" in proc.stderr
    assert "junk.json is not JSON" in proc.stderr and "gone.json does not exist" in proc.stderr
    assert_no_secrets(proc, private)


def test_show_prints_names_and_fingerprints_never_secrets(tmp_path: Path) -> None:
    assert create("york", tmp_path).returncode == 0
    private, public = tmp_path / "york.key", tmp_path / "york.public.json"
    assert securefed("keys", "roster", str(public), "--out", str(tmp_path / "r.json")).returncode == 0
    shown = {}
    for path in (private, public, tmp_path / "r.json"):
        proc = securefed("keys", "show", str(path), "--json")
        assert proc.returncode == 0, proc.stderr
        assert_no_secrets(proc, private)
        shown[path.name] = json.loads(proc.stdout)
    assert shown["york.key"]["kind"] == "private identity"
    assert shown["york.public.json"]["kind"] == "public identity"
    site = {k: v for k, v in shown["york.key"].items() if k not in ("file", "kind")}
    assert site["name"] == "york"
    assert {k: v for k, v in shown["york.public.json"].items() if k not in ("file", "kind")} == site
    assert shown["r.json"]["sites"] == [site]
    # The fingerprint is derived from the public key alone: recompute it independently.
    verify_key = SiteIdentity.load(private).public().verify_key
    assert site["verify_key_fingerprint"].replace(":", "") == hashlib.sha256(verify_key).hexdigest()[:32]
    proc = securefed("keys", "show", str(private))
    assert proc.returncode == 0 and "york" in proc.stdout and site["encryption_key_fingerprint"] in proc.stdout
    assert_no_secrets(proc, private)


def test_show_refuses_a_private_file_others_can_read(tmp_path: Path) -> None:
    assert create("bath", tmp_path).returncode == 0
    private = tmp_path / "bath.key"
    os.chmod(private, 0o644)
    proc = securefed("keys", "show", str(private))
    assert proc.returncode == 2 and "chmod 600" in proc.stderr
    assert_no_secrets(proc, private)
    (tmp_path / "other.json").write_text('{"hello": 1}')
    proc = securefed("keys", "show", str(tmp_path / "other.json"))
    assert proc.returncode == 2 and "not a securefed key or roster file" in proc.stderr
