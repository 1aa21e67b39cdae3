"""``securefed ledger verify|show``: an auditor's view of a site's ledger from the command line."""

from __future__ import annotations

import json
import sqlite3

import pytest

from securefed.cli import main
from securefed.primitives.identity import SiteIdentity
from securefed.primitives.randomness import SeededRandom
from securefed.primitives.roster import Roster
from securefed.privacy import PoissonSampledGaussian, PrivacyBudget, PrivacyLedger, compose_epsilon

EVENT = PoissonSampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=100)


@pytest.fixture
def site(tmp_path):
    identity = SiteIdentity.generate("guys", SeededRandom("guys"))
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger.create(path, identity=identity, budget=PrivacyBudget(epsilon=3.0, delta=1e-5)) as ledger:
        ledger.charge(EVENT, round_id="1")
        ledger.charge(EVENT, round_id="2")
        head = ledger.head()
    (tmp_path / "pub.json").write_text(json.dumps(identity.public().to_dict()))
    (tmp_path / "head.json").write_text(json.dumps(head.to_dict()))
    Roster([identity.public()]).save(tmp_path / "roster.json")
    return tmp_path


def test_verify_and_show_an_untouched_ledger(site, capsys) -> None:
    assert main(["ledger", "verify", str(site / "ledger.sqlite"), "--public-key", str(site / "pub.json")]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["ledger", "show", str(site / "ledger.sqlite"), "--roster", str(site / "roster.json"),
                 "--site", "guys", "--head", str(site / "head.json"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["kind"] for e in shown["entries"]] == ["genesis", "charge", "charge"]
    assert shown["spent"]["epsilon"] == pytest.approx(compose_epsilon([EVENT, EVENT], delta=1e-5), rel=1e-12)
    assert shown["budget"] == {"epsilon": 3.0, "delta": 1e-5}


def test_tampering_and_truncation_fail_verification(site, capsys) -> None:
    ledger = str(site / "ledger.sqlite")
    with sqlite3.connect(ledger) as db:
        db.execute("DELETE FROM entries WHERE seq = 2")
    # Without the published head a cut-off tail is invisible; with it, verification fails.
    assert main(["ledger", "verify", ledger, "--public-key", str(site / "pub.json")]) == 0
    assert main(["ledger", "verify", ledger, "--public-key", str(site / "pub.json"),
                 "--head", str(site / "head.json"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert not report["valid"] and "truncated" in {p["kind"] for p in report["problems"]}
    with sqlite3.connect(ledger) as db:
        db.execute("UPDATE entries SET note = 'edited' WHERE seq = 1")
    assert main(["ledger", "show", ledger, "--public-key", str(site / "pub.json")]) == 1
    assert "changed after it was signed" in capsys.readouterr().err


def test_a_foreign_key_and_bad_arguments_are_named(site, capsys) -> None:
    other = SiteIdentity.generate("guys", SeededRandom("impostor"))
    (site / "other.json").write_text(json.dumps(other.public().to_dict()))
    assert main(["ledger", "verify", str(site / "ledger.sqlite"), "--public-key", str(site / "other.json")]) == 1
    assert main(["ledger", "verify", str(site / "ledger.sqlite")]) == 2
    assert "--public-key" in capsys.readouterr().err
    assert main(["ledger", "verify", str(site / "ledger.sqlite"), "--roster", str(site / "roster.json"),
                 "--site", "barts"]) == 2
    assert "not in the roster" in capsys.readouterr().err
    assert main(["ledger", "show", str(site / "missing.sqlite"), "--public-key", str(site / "pub.json")]) == 2


def test_another_ledger_of_the_same_site_is_caught_by_its_id(site, capsys) -> None:
    args = [str(site / "ledger.sqlite"), "--public-key", str(site / "pub.json")]
    assert main(["ledger", "show", *args, "--json"]) == 0
    ledger_id = json.loads(capsys.readouterr().out)["ledger_id"]
    assert main(["ledger", "verify", *args, "--ledger-id", ledger_id]) == 0
    assert main(["ledger", "verify", *args, "--ledger-id", "00" * 16]) == 1
    assert main(["ledger", "show", *args, "--ledger-id", "00" * 16]) == 1
