"""Tampering with a privacy ledger behind securefed's back, through sqlite3, is detected.

Each test edits the database the way an attacker (or a careless administrator) could and checks
that verification under the site's real public key names the specific problem, that
``check()`` raises, and that the ledger can no longer be opened for writing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from securefed.errors import LedgerIntegrityError
from securefed.primitives.identity import SiteIdentity
from securefed.privacy.accounting import compose_epsilon
from securefed.privacy.events import DistributedDiscreteGaussian, PoissonSampledGaussian
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger, ProblemKind, verify_ledger_file
from securefed.privacy.ledger_codec import COLUMNS, entry_digest
from securefed.privacy.ledger_records import signed_message

DELTA = 1e-5
SITE = SiteIdentity("hospital-a", bytes(range(32)), bytes(range(32, 64)))
ATTACKER = SiteIdentity("hospital-a", bytes(range(128, 160)), bytes(range(160, 192)))
DPSGD = PoissonSampledGaussian(noise_multiplier=1.1, sample_rate=0.01, steps=100)
BUDGET = PrivacyBudget(epsilon=3.0, delta=DELTA)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A clean ledger: genesis (seq 0) and five charges (seq 1 to 5)."""
    path = tmp_path / "ledger.db"
    with PrivacyLedger.create(path, identity=SITE, budget=BUDGET) as ledger:
        for i in range(1, 6):
            ledger.charge(DPSGD, round_id=f"round-{i}")
    assert verify_ledger_file(path, SITE.public()) == []
    return path


def sql(path: Path, statement: str, *params: object) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute(statement, params)
    connection.close()


def rows(path: Path) -> list[dict[str, object]]:
    with sqlite3.connect(path) as connection:
        found = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM entries ORDER BY seq").fetchall()
    connection.close()
    return [dict(zip(COLUMNS, row)) for row in found]


def problems_of(path: Path, **kw: object) -> set[tuple[ProblemKind, int | None]]:
    return {(p.kind, p.seq) for p in verify_ledger_file(path, SITE.public(), **kw)}


def assert_refused(path: Path) -> None:
    with pytest.raises(LedgerIntegrityError, match="failed verification"):
        PrivacyLedger.open(path, identity=SITE)


def seal(row: dict[str, object], identity: SiteIdentity) -> dict[str, object]:
    row = dict(row)
    row["entry_hash"] = entry_digest(row)
    row["signature"] = identity.sign(signed_message(row["seq"], row["entry_hash"]))
    return row


def insert(path: Path, row: dict[str, object]) -> None:
    sql(path, f"INSERT INTO entries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        *(row[c] for c in COLUMNS))


def test_editing_an_event_parameter_is_detected(ledger_path: Path) -> None:
    with PrivacyLedger.read(ledger_path, public_key=SITE.public()) as audit:
        sql(ledger_path, "UPDATE entries SET event = replace(event, '1.1', '9.0') WHERE seq = 2")
        assert '"noise_multiplier":9.0' in rows(ledger_path)[2]["event"]
        found = {(p.kind, p.seq) for p in audit.verify()}
        assert (ProblemKind.HASH_MISMATCH, 2) in found
        assert all(kind is not ProblemKind.HASH_MISMATCH or seq == 2 for kind, seq in found)
        with pytest.raises(LedgerIntegrityError, match="entry 2: its content was changed"):
            audit.check()
    assert_refused(ledger_path)


def test_editing_a_recorded_epsilon_is_detected(ledger_path: Path) -> None:
    sql(ledger_path, "UPDATE entries SET epsilon_after = 0.1 WHERE seq = 3")
    # An edited row is untrusted: reported once, never decoded or recomputed (nor what follows).
    assert problems_of(ledger_path) == {(ProblemKind.HASH_MISMATCH, 3)}
    assert_refused(ledger_path)


def test_deleting_a_middle_entry_is_detected(ledger_path: Path) -> None:
    sql(ledger_path, "DELETE FROM entries WHERE seq = 3")
    found = problems_of(ledger_path)
    assert (ProblemKind.SEQUENCE, 4) in found and (ProblemKind.BROKEN_CHAIN, 4) in found
    assert_refused(ledger_path)


def test_swapping_two_entries_is_detected(ledger_path: Path) -> None:
    second, third = rows(ledger_path)[2:4]
    columns = [c for c in COLUMNS if c != "seq"]
    assignments = ", ".join(f"{c} = ?" for c in columns)
    sql(ledger_path, f"UPDATE entries SET {assignments} WHERE seq = 2", *(third[c] for c in columns))
    sql(ledger_path, f"UPDATE entries SET {assignments} WHERE seq = 3", *(second[c] for c in columns))
    found = problems_of(ledger_path)
    assert {(ProblemKind.HASH_MISMATCH, 2), (ProblemKind.HASH_MISMATCH, 3)} <= found
    assert {(ProblemKind.BROKEN_CHAIN, 2), (ProblemKind.BROKEN_CHAIN, 3), (ProblemKind.BROKEN_CHAIN, 4)} <= found
    assert_refused(ledger_path)


def test_a_chain_rewritten_and_re_signed_with_another_key_is_detected(ledger_path: Path) -> None:
    # The attacker rebuilds every entry consistently (a looser budget, cheaper events) and signs
    # it all with their own key, which they also write into the genesis record.
    original = rows(ledger_path)
    sql(ledger_path, "DELETE FROM entries")
    previous = bytes(32)
    for row in original:
        row = dict(row, prev_hash=previous)
        if row["seq"] == 0:
            genesis = json.loads(row["genesis"])
            genesis["verify_key"] = ATTACKER.public().verify_key.hex()
            genesis["budget"]["epsilon"] = 50.0
            row["genesis"] = json.dumps(genesis, sort_keys=True, separators=(",", ":"))
        row = seal(row, ATTACKER)
        insert(ledger_path, row)
        previous = row["entry_hash"]
    # Internally consistent: under the attacker's key it verifies cleanly...
    assert verify_ledger_file(ledger_path, ATTACKER.public()) == []
    # ...but the trusted key comes from the caller, and every entry fails under it.
    found = problems_of(ledger_path)
    assert found == {(ProblemKind.WRONG_KEY, 0)} | {(ProblemKind.BAD_SIGNATURE, s) for s in range(6)}
    assert_refused(ledger_path)


def test_editing_the_genesis_budget_is_detected(ledger_path: Path) -> None:
    sql(ledger_path, "UPDATE entries SET genesis = replace(genesis, '\"epsilon\":3.0', '\"epsilon\":30.0') WHERE seq = 0")
    assert '"epsilon":30.0' in rows(ledger_path)[0]["genesis"]
    assert (ProblemKind.HASH_MISMATCH, 0) in problems_of(ledger_path)
    assert_refused(ledger_path)


def test_truncating_the_tail_needs_a_checkpoint_to_be_detected(ledger_path: Path) -> None:
    with PrivacyLedger.read(ledger_path, public_key=SITE.public()) as audit:
        head = audit.head()
    sql(ledger_path, "DELETE FROM entries WHERE seq >= 4")
    # A hash chain alone cannot tell a cut-off ledger from a shorter one (documented limitation).
    assert problems_of(ledger_path) == set()
    assert problems_of(ledger_path, expected_head=head) == {(ProblemKind.TRUNCATED, 5)}
    # Cutting the tail and appending a forged replacement is caught by the same checkpoint.
    with PrivacyLedger.open(ledger_path, identity=SITE) as ledger:
        ledger.charge(DPSGD, round_id="round-4-again")
        ledger.charge(DPSGD, round_id="round-5-again")
        with pytest.raises(LedgerIntegrityError, match="rewritten"):
            ledger.check(expected_head=head)


def test_a_writer_notices_entries_removed_under_it(ledger_path: Path) -> None:
    with PrivacyLedger.open(ledger_path, identity=SITE) as ledger:
        sql(ledger_path, "DELETE FROM entries WHERE seq = 5")
        with pytest.raises(LedgerIntegrityError, match="removed or rewritten"):
            ledger.charge(DPSGD, round_id="round-6")


def _next_row(path: Path, *, epsilon_after: float, event: PoissonSampledGaussian) -> dict[str, object]:
    last = rows(path)[-1]
    return dict(last, seq=last["seq"] + 1, round_id="forged", prev_hash=last["entry_hash"],
                event=json.dumps(event.to_record(), sort_keys=True, separators=(",", ":")),
                epsilon_after=epsilon_after)


def test_a_validly_signed_entry_with_wrong_arithmetic_is_detected(ledger_path: Path) -> None:
    # A buggy or dishonest site signs an under-reported epsilon with its real key: the hash and
    # signature hold, only recomputing the composition shows it.
    honest = compose_epsilon([DPSGD] * 6, delta=DELTA, accountant="rdp")
    insert(ledger_path, seal(_next_row(ledger_path, epsilon_after=honest * 0.9, event=DPSGD), SITE))
    assert problems_of(ledger_path) == {(ProblemKind.SPEND_MISMATCH, 6)}


def test_a_validly_signed_charge_over_the_budget_is_detected(ledger_path: Path) -> None:
    big = PoissonSampledGaussian(noise_multiplier=0.8, sample_rate=0.05, steps=500)
    epsilon = compose_epsilon([DPSGD] * 5 + [big], delta=DELTA, accountant="rdp")
    assert epsilon > BUDGET.epsilon  # premise
    insert(ledger_path, seal(_next_row(ledger_path, epsilon_after=epsilon, event=big), SITE))
    assert problems_of(ledger_path) == {(ProblemKind.OVER_BUDGET, 6)}


def test_a_validly_signed_wrong_delta_is_detected(ledger_path: Path) -> None:
    honest = compose_epsilon([DPSGD] * 6, delta=DELTA, accountant="rdp")
    insert(ledger_path, seal(dict(_next_row(ledger_path, epsilon_after=honest, event=DPSGD), delta_after=DELTA * 10),
                             SITE))
    assert problems_of(ledger_path) == {(ProblemKind.SPEND_MISMATCH, 6)}


def test_a_validly_signed_genesis_entry_after_entry_0_is_detected(ledger_path: Path) -> None:
    genesis = rows(ledger_path)[0]
    last = rows(ledger_path)[-1]
    insert(ledger_path, seal(dict(genesis, seq=6, prev_hash=last["entry_hash"]), SITE))
    found = problems_of(ledger_path)
    assert found == {(ProblemKind.INCONSISTENT_ENTRY, 6)}
    assert_refused(ledger_path)


def test_a_validly_signed_genesis_entry_is_accepted_only_as_entry_0(ledger_path: Path) -> None:
    # A chain that starts with a charge and puts its genesis record second, all signed by the site.
    genesis, charge = rows(ledger_path)[:2]
    sql(ledger_path, "DELETE FROM entries")
    first = seal(dict(charge, seq=0, prev_hash=bytes(32)), SITE)
    insert(ledger_path, first)
    insert(ledger_path, seal(dict(genesis, seq=1, prev_hash=first["entry_hash"]), SITE))
    found = problems_of(ledger_path)
    assert (ProblemKind.MISSING_GENESIS, 0) in found and (ProblemKind.INCONSISTENT_ENTRY, 1) in found
    assert_refused(ledger_path)


# -- a ledger with every kind of entry, for cell edits ---------------------------------------------

WORST = DistributedDiscreteGaussian(l2_sensitivity=64.0, l1_sensitivity=512.0, site_sigma=40.0, sites=3,
                                    dimension=64, cohort=6)


@pytest.fixture
def varied_path(tmp_path: Path) -> Path:
    """genesis (0), DP-SGD charge (1), distributed charge (2), its settle (3), noted charge (4)."""
    path = tmp_path / "varied.db"
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=20.0, delta=DELTA)) as ledger:
        ledger.charge(DPSGD, round_id="round-1")
        charge = ledger.charge(WORST, round_id="round-2")
        ledger.settle(charge.seq, dataclasses.replace(WORST, sites=5), note="5 of 6 sites survived")
        ledger.charge(dataclasses.replace(DPSGD, steps=10), round_id="round-3", note="short round")
    assert verify_ledger_file(path, SITE.public()) == []
    return path


def _same_meaning(column: str, value: object) -> object:
    """Another value of the same SQLite type, as close in meaning as the column allows."""
    if column in ("event", "genesis"):
        if value is None:  # a NULL column gains content: the smallest JSON there is
            return "{}"
        return json.dumps(json.loads(value), sort_keys=True)  # the same JSON with spaces
    if column == "recorded_at":
        return (datetime.fromisoformat(value) + timedelta(microseconds=1)).isoformat(timespec="microseconds")
    if column == "kind":
        return "settle" if value == "charge" else "charge"
    if column == "accountant":
        return "pld"
    if column == "seq":
        return value + 100
    if column == "settles":
        return 1 if value is None else value + 1
    if isinstance(value, bytes):
        return bytes([value[0] ^ 1]) + value[1:]
    if isinstance(value, float):
        return math.nextafter(value, math.inf)  # one ulp: the exact float encoding catches it
    return value + " "


def test_every_single_cell_edit_is_caught_by_the_hash_or_the_signature(varied_path: Path) -> None:
    pristine = varied_path.read_bytes()  # closed ledger: every page is in the main file
    original = rows(varied_path)
    assert original[3]["settles"] == 2 and original[4]["note"] == "short round"  # the fixture's premise
    for row in original:
        for column in COLUMNS:
            varied_path.write_bytes(pristine)
            new_value = _same_meaning(column, row[column])
            sql(varied_path, f"UPDATE entries SET {column} = ? WHERE seq = ?", new_value, row["seq"])
            seq = new_value if column == "seq" else row["seq"]
            found = {kind for kind, at in problems_of(varied_path) if at == seq}
            expected = ProblemKind.BAD_SIGNATURE if column == "signature" else ProblemKind.HASH_MISMATCH
            assert expected in found, f"edit of {column} in entry {row['seq']} gave {found}"
    varied_path.write_bytes(pristine)
    assert verify_ledger_file(varied_path, SITE.public()) == []


def test_a_validly_signed_settle_of_another_charge_is_detected(varied_path: Path) -> None:
    settle = rows(varied_path)[3]
    sql(varied_path, "DELETE FROM entries WHERE seq >= 3")
    # Re-signed with the real key: the settle now claims to settle the DP-SGD charge (entry 1).
    insert(varied_path, seal(dict(settle, settles=1), SITE))
    assert problems_of(varied_path) == {(ProblemKind.BAD_SETTLE, 3), (ProblemKind.SPEND_MISMATCH, 3)}
