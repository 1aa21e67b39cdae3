"""The privacy ledger: round trips, budget enforcement, settles, checkpoints and bad files.

Epsilons are checked against ``compose_epsilon`` over the plain event list (the ledger's
contract) and, for DP-SGD events, against dp-accounting's RDP accountant (independent).
"""

from __future__ import annotations

import math
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from securefed.errors import (
    ConfigError,
    LedgerIntegrityError,
    PrivacyBudgetExceeded,
    UnsupportedMechanismError,
)
from securefed.primitives.identity import SiteIdentity
from securefed.privacy.accounting import compose_epsilon
from securefed.privacy.events import DistributedDiscreteGaussian, PoissonSampledGaussian
from securefed.privacy.ledger import (
    EntryKind,
    LedgerHead,
    PrivacyBudget,
    PrivacyLedger,
    ProblemKind,
    verify_ledger_file,
)

DELTA = 1e-5
SITE = SiteIdentity("hospital-a", bytes(range(32)), bytes(range(32, 64)))
OTHER_SITE = SiteIdentity("hospital-b", bytes(range(64, 96)), bytes(range(96, 128)))
DPSGD = PoissonSampledGaussian(noise_multiplier=1.1, sample_rate=0.01, steps=100)
DPSGD_NOISIER = PoissonSampledGaussian(noise_multiplier=2.0, sample_rate=0.02, steps=50)
TINY = PoissonSampledGaussian(noise_multiplier=50.0, sample_rate=0.001, steps=1)


def ddg(sites: int, cohort: int | None = None) -> DistributedDiscreteGaussian:
    return DistributedDiscreteGaussian(l2_sensitivity=64.0, l1_sensitivity=512.0, site_sigma=40.0,
                                       sites=sites, dimension=64, cohort=cohort)


def compose(events: list) -> float:
    return compose_epsilon(events, delta=DELTA, accountant="rdp")


def dp_accounting_epsilon(events: list[PoissonSampledGaussian]) -> float:
    accountant = RdpAccountant()  # its default orders, like securefed's RDP accountant
    for event in events:
        gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(event.sample_rate, gaussian), event.steps)
    return accountant.get_epsilon(DELTA)


def files_state(path: Path) -> dict[str, bytes]:
    # The database and its write-ahead log; -shm is SQLite's in-memory index and its read marks.
    return {p.name: p.read_bytes() for p in path.parent.iterdir()
            if p.name.startswith(path.name) and not p.name.endswith("-shm")}


def row_count(path: Path) -> int:
    with sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT count(*) FROM entries").fetchone()[0]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "site-ledger.db"


def test_round_trip_records_every_charge_with_its_composed_epsilon(path: Path) -> None:
    events = [DPSGD, DPSGD_NOISIER, DPSGD, DPSGD]
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=8.0, delta=DELTA)) as ledger:
        assert ledger.spent().epsilon == 0.0
        written = [ledger.charge(e, round_id=f"round-{i}", note=f"n{i}") for i, e in enumerate(events)]
        spent = ledger.spent()
    previous = 0.0
    for i, entry in enumerate(written):
        assert entry.kind is EntryKind.CHARGE and entry.seq == i + 1 and entry.event == events[i]
        assert math.isclose(entry.epsilon_after, compose(events[: i + 1]), rel_tol=1e-9)
        assert math.isclose(entry.epsilon_after, dp_accounting_epsilon(events[: i + 1]), rel_tol=1e-3)
        assert entry.epsilon_after > previous and entry.delta_after == DELTA
        previous = entry.epsilon_after
    with PrivacyLedger.open(path, identity=SITE) as reopened:
        assert reopened.entries()[1:] == written
        assert reopened.entries()[0].kind is EntryKind.GENESIS
        assert reopened.spent() == spent and spent.epsilon == written[-1].epsilon_after
        assert reopened.events() == events
        assert reopened.budget == PrivacyBudget(epsilon=8.0, delta=DELTA) and reopened.site == "hospital-a"
        assert math.isclose(reopened.remaining(), 8.0 - spent.epsilon)
        assert reopened.verify() == []
    with PrivacyLedger.read(path, public_key=SITE.public()) as audit:
        assert audit.entries()[1:] == written and audit.verify() == []


def test_a_charge_over_budget_is_refused_and_writes_nothing(path: Path) -> None:
    two, three = compose([DPSGD] * 2), compose([DPSGD] * 3)
    budget = PrivacyBudget(epsilon=(two + three) / 2, delta=DELTA)
    with PrivacyLedger.create(path, identity=SITE, budget=budget) as ledger:
        ledger.charge(DPSGD, round_id="r1")
        ledger.charge(DPSGD, round_id="r2")
        before_files, before_rows = files_state(path), row_count(path)
        with pytest.raises(PrivacyBudgetExceeded) as refused:
            ledger.charge(DPSGD, round_id="r3")
        message = str(refused.value)
        assert f"{two:.6g}" in message and f"{three:.6g}" in message and f"{budget.epsilon:g}" in message
        assert "Nothing was recorded" in message
        assert files_state(path) == before_files and row_count(path) == before_rows == 3
        assert ledger.spent().epsilon == pytest.approx(two, rel=1e-9)
        assert compose([DPSGD, DPSGD, TINY]) <= budget.epsilon  # the test's premise
        assert ledger.charge(TINY, round_id="r3-small").seq == 3
        assert ledger.verify() == []


def test_two_writers_on_one_file_share_the_budget(path: Path) -> None:
    budget = PrivacyBudget(epsilon=(compose([DPSGD] * 2) + compose([DPSGD] * 3)) / 2, delta=DELTA)
    with PrivacyLedger.create(path, identity=SITE, budget=budget) as first, \
            PrivacyLedger.open(path, identity=SITE) as second:
        first.charge(DPSGD, round_id="from-first")
        second.charge(DPSGD, round_id="from-second")  # sees the first writer's charge
        with pytest.raises(PrivacyBudgetExceeded):
            first.charge(DPSGD, round_id="one-too-many")
        assert first.entries() == second.entries() and len(first.entries()) == 3
        assert [e.round_id for e in first.entries()[1:]] == ["from-first", "from-second"]


def test_the_budget_is_exact_up_to_rounding(path: Path) -> None:
    exact = compose([DPSGD, DPSGD])
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=exact, delta=DELTA)) as ledger:
        ledger.charge(DPSGD, round_id="r1")
        ledger.charge(DPSGD, round_id="r2")  # lands on the budget exactly
    tighter = path.with_name("tighter.db")
    with PrivacyLedger.create(tighter, identity=SITE, budget=PrivacyBudget(epsilon=exact * (1 - 1e-9), delta=DELTA)) as ledger:
        ledger.charge(DPSGD, round_id="r1")
        with pytest.raises(PrivacyBudgetExceeded):
            ledger.charge(DPSGD, round_id="r2")


def test_a_pld_ledger_composes_with_the_pld_accountant(path: Path) -> None:
    events = [DPSGD, DPSGD_NOISIER, DPSGD]
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA),
                              accountant="pld") as ledger:
        last = [ledger.charge(e, round_id=f"r{i}") for i, e in enumerate(events)][-1]
        pld = compose_epsilon(events, delta=DELTA, accountant="pld")
        assert math.isclose(last.epsilon_after, pld, rel_tol=1e-9) and pld < compose(events)
        before = files_state(path)
        with pytest.raises(UnsupportedMechanismError):  # PLD has no distributed discrete Gaussian
            ledger.charge(ddg(3), round_id="r3")
        assert files_state(path) == before and len(ledger.entries()) == 4
    assert verify_ledger_file(path, SITE.public()) == []


def test_preview_composes_without_writing(path: Path) -> None:
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=0.5, delta=DELTA)) as ledger:
        before = files_state(path)
        preview = ledger.preview(DPSGD_NOISIER)
        assert math.isclose(preview.epsilon, compose([DPSGD_NOISIER]), rel_tol=1e-9) and preview.delta == DELTA
        big = ledger.preview(DPSGD)  # over budget: preview reports, charge would refuse
        assert big.epsilon > 0.5 and files_state(path) == before and len(ledger.entries()) == 1


def test_settle_replaces_the_worst_case_charge_with_what_ran(path: Path) -> None:
    worst, actual = ddg(3, cohort=8), ddg(8, cohort=8)
    budget = PrivacyBudget(epsilon=(compose([worst]) + compose([worst, worst])) / 2, delta=DELTA)
    with PrivacyLedger.create(path, identity=SITE, budget=budget) as ledger:
        charge = ledger.charge(worst, round_id="round-1")
        with pytest.raises(PrivacyBudgetExceeded):
            ledger.charge(worst, round_id="round-2")
        settle = ledger.settle(charge.seq, actual, note="8 sites survived")
        assert settle.kind is EntryKind.SETTLE and settle.settles == charge.seq
        assert settle.round_id == "round-1" and settle.event == actual
        assert ledger.events() == [actual]
        assert math.isclose(settle.epsilon_after, compose([actual]), rel_tol=1e-9)
        assert settle.epsilon_after < charge.epsilon_after
        second = ledger.charge(worst, round_id="round-2")  # fits now that round 1 cost less
        assert math.isclose(second.epsilon_after, compose([actual, worst]), rel_tol=1e-9)
        with pytest.raises(ConfigError, match="cannot be settled with a poisson"):
            ledger.settle(second.seq, DPSGD)
    assert verify_ledger_file(path, SITE.public()) == []


def test_head_is_a_signed_checkpoint_that_round_trips(path: Path) -> None:
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)) as ledger:
        ledger.charge(DPSGD, round_id="r1")
        head = ledger.head()
        assert head.seq == 1 and head == LedgerHead.from_dict(head.to_dict())
        head.verify(SITE.public())
        with pytest.raises(LedgerIntegrityError):
            head.verify(OTHER_SITE.public())
        ledger.charge(DPSGD, round_id="r2")
        assert ledger.verify(expected_head=head) == []  # a later ledger still contains it
        forged = LedgerHead(seq=1, entry_hash=bytes(32), signature=head.signature)
        kinds = {p.kind for p in ledger.verify(expected_head=forged)}
        assert kinds == {ProblemKind.HEAD_MISMATCH}


def test_read_only_ledger_refuses_to_write(path: Path) -> None:
    PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)).close()
    before = files_state(path)
    with PrivacyLedger.read(path, public_key=SITE.public()) as audit:
        assert audit.read_only
        with pytest.raises(ConfigError, match="read-only"):
            audit.charge(DPSGD, round_id="r1")
        with pytest.raises(ConfigError, match="read-only"):
            audit.settle(1, DPSGD)
    assert row_count(path) == 1 and files_state(path)["site-ledger.db"] == before["site-ledger.db"]


def test_create_and_open_or_create(path: Path) -> None:
    budget = PrivacyBudget(epsilon=5.0, delta=DELTA)
    with PrivacyLedger.open_or_create(path, identity=SITE, budget=budget, accountant="rdp") as ledger:
        ledger.charge(DPSGD, round_id="r1")
    with pytest.raises(ConfigError, match="already exists"):
        PrivacyLedger.create(path, identity=SITE, budget=budget)
    with PrivacyLedger.open_or_create(path, identity=SITE, budget=budget) as ledger:
        assert len(ledger.entries()) == 2
    with pytest.raises(ConfigError) as mismatch:
        PrivacyLedger.open_or_create(path, identity=SITE, budget=PrivacyBudget(epsilon=9.0, delta=DELTA),
                                     accountant="pld")
    assert len(mismatch.value.problems) == 2
    with pytest.raises(ConfigError, match="does not exist"):
        PrivacyLedger.create(path.parent / "missing-dir" / "l.db", identity=SITE, budget=budget)
    assert sorted(p.name for p in path.parent.iterdir()) == ["site-ledger.db"]  # no litter


def test_recorded_time_comes_from_the_injected_clock(path: Path) -> None:
    moment = datetime(2026, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA),
                              clock=lambda: moment) as ledger:
        entry = ledger.charge(DPSGD, round_id="r1")
    assert entry.recorded_at == "2026-03-01T12:30:00.000000+00:00"
    with pytest.raises(ConfigError, match="timezone-aware"):
        PrivacyLedger.create(path.with_name("naive.db"), identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA),
                             clock=lambda: datetime(2026, 3, 1))


def test_bad_arguments_are_reported_together(path: Path) -> None:
    with pytest.raises(ConfigError) as budget_error:
        PrivacyBudget(epsilon=-1.0, delta=1.5)
    assert len(budget_error.value.problems) == 2
    for epsilon in (0.0, math.inf, math.nan, 101.0, True):
        with pytest.raises(ConfigError):
            PrivacyBudget(epsilon=epsilon, delta=DELTA)
    with pytest.raises(ConfigError):
        PrivacyBudget(epsilon=1.0, delta=0.0)
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)) as ledger:
        with pytest.raises(ConfigError) as charge_error:
            ledger.charge("dp-sgd", round_id="", note=7)  # type: ignore[arg-type]
        assert len(charge_error.value.problems) == 3
        assert len(ledger.entries()) == 1
    with pytest.raises(ConfigError, match="closed"):
        ledger.spent()


# -- files that are not (valid) ledgers -----------------------------------------------------------


def _refused(path: Path, match: str) -> None:
    with pytest.raises(LedgerIntegrityError, match=match):
        PrivacyLedger.open(path, identity=SITE)
    with pytest.raises(LedgerIntegrityError, match=match):
        PrivacyLedger.read(path, public_key=SITE.public())
    problems = verify_ledger_file(path, SITE.public())
    assert [p.kind for p in problems] == [ProblemKind.NOT_A_LEDGER] and match in problems[0].message


def test_random_bytes_and_empty_files_are_not_ledgers(path: Path) -> None:
    path.write_bytes(os.urandom(8192))
    _refused(path, "not a SQLite database")
    path.write_bytes(b"")
    _refused(path, "empty file")
    assert path.read_bytes() == b""  # opening for writing did not turn it into a database


def test_another_sqlite_database_is_not_a_ledger(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    _refused(path, "not a securefed privacy ledger")


def test_unknown_format_version_and_altered_schema_are_refused(path: Path) -> None:
    PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)).close()
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 7")
    _refused(path, "format version 7")
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 2")
        connection.execute("CREATE TRIGGER keep_quiet AFTER INSERT ON entries BEGIN DELETE FROM entries; END")
    _refused(path, "modified schema")
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TRIGGER keep_quiet")
    assert verify_ledger_file(path, SITE.public()) == []
    # Same columns, looser types: only the exact CREATE TABLE text shows it.
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA writable_schema = ON")
        connection.execute("UPDATE sqlite_master SET sql = replace(sql, 'note TEXT NOT NULL', 'note ANY NOT NULL')")
    _refused(path, "modified schema")


def test_truncated_database_file_is_refused(path: Path) -> None:
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=50.0, delta=DELTA)) as ledger:
        for i in range(40):
            ledger.charge(TINY, round_id=f"r{i}", note="x" * 200)
    size = path.stat().st_size  # closing checkpointed every page into the file
    assert size >= 4 * 4096
    with path.open("r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(LedgerIntegrityError, match="corrupt"):
        PrivacyLedger.read(path, public_key=SITE.public())
    problems = verify_ledger_file(path, SITE.public())
    assert problems and {p.kind for p in problems} <= {ProblemKind.CORRUPT_DATABASE, ProblemKind.NOT_A_LEDGER}


def test_missing_file_and_wrong_key(path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as missing:
        PrivacyLedger.open(path, identity=SITE)
    assert str(path) in str(missing.value)
    with pytest.raises(ConfigError):
        verify_ledger_file(path, SITE.public())
    PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)).close()
    with pytest.raises(LedgerIntegrityError, match="not the trusted key") as wrong:
        PrivacyLedger.open(path, identity=OTHER_SITE)
    assert bytes(range(64, 96)).hex() not in str(wrong.value)  # no secret material in messages
    kinds = {p.kind for p in verify_ledger_file(path, OTHER_SITE.public())}
    assert kinds == {ProblemKind.WRONG_KEY, ProblemKind.BAD_SIGNATURE}


# -- which ledger this is -------------------------------------------------------------------------


def test_every_ledger_has_its_own_id_and_a_swapped_file_is_caught(path: Path) -> None:
    budget = PrivacyBudget(epsilon=5.0, delta=DELTA)
    moment = datetime(2026, 1, 1, tzinfo=timezone.utc)
    other = path.with_name("other.db")
    with PrivacyLedger.create(path, identity=SITE, budget=budget, clock=lambda: moment) as ledger:
        ledger_id, head = ledger.ledger_id, ledger.head()
    with PrivacyLedger.create(other, identity=SITE, budget=budget, clock=lambda: moment) as twin:
        assert twin.ledger_id != ledger_id and len(ledger_id) == 32 and int(ledger_id, 16) >= 0
        assert twin.head().entry_hash != head.entry_hash  # same site, budget and time: still another chain
    with PrivacyLedger.read(path, public_key=SITE.public(), expected_ledger_id=ledger_id,
                            expected_head=head) as audit:
        assert audit.ledger_id == ledger_id
    other.replace(path)  # the site's other ledger copied over this one
    assert verify_ledger_file(path, SITE.public()) == []  # a chain alone cannot tell
    found = {p.kind for p in verify_ledger_file(path, SITE.public(), expected_ledger_id=ledger_id)}
    assert found == {ProblemKind.LEDGER_MISMATCH}
    assert {p.kind for p in verify_ledger_file(path, SITE.public(), expected_head=head)} == {ProblemKind.HEAD_MISMATCH}
    wrong_budget = PrivacyBudget(epsilon=4.0, delta=DELTA)
    assert {p.kind for p in verify_ledger_file(path, SITE.public(), expected_budget=wrong_budget)} == {
        ProblemKind.LEDGER_MISMATCH}
    with pytest.raises(LedgerIntegrityError, match="not the expected ledger"):
        PrivacyLedger.open(path, identity=SITE, expected_ledger_id=ledger_id)
    with pytest.raises(LedgerIntegrityError, match="differs from the checkpoint"):
        PrivacyLedger.read(path, public_key=SITE.public(), expected_head=head)
    with pytest.raises(ConfigError, match="expected_ledger_id"):
        PrivacyLedger.open(path, identity=SITE, expected_ledger_id="not-hex")
    with pytest.raises(ConfigError, match="expected_head"):
        verify_ledger_file(path, SITE.public(), expected_head=head.to_dict())  # type: ignore[arg-type]


def test_a_deleted_ledger_is_not_silently_recreated(path: Path) -> None:
    budget = PrivacyBudget(epsilon=5.0, delta=DELTA)
    with PrivacyLedger.open_or_create(path, identity=SITE, budget=budget) as ledger:
        ledger.charge(DPSGD, round_id="r1")
        head, ledger_id = ledger.head(), ledger.ledger_id
    path.unlink()
    for expectation in ({"expected_head": head}, {"expected_ledger_id": ledger_id}):
        with pytest.raises(LedgerIntegrityError, match="is missing"):
            PrivacyLedger.open_or_create(path, identity=SITE, budget=budget, **expectation)
    assert not path.exists()


def test_text_with_a_lone_surrogate_is_refused(path: Path) -> None:
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)) as ledger:
        with pytest.raises(ConfigError, match="surrogate") as refused:
            ledger.charge(DPSGD, round_id="r\udc80", note="x\ud800")
        assert len(refused.value.problems) == 2 and len(ledger.entries()) == 1
        ledger.charge(DPSGD, round_id="r-\u00e9t\u00e9 \U0001F600")  # any real Unicode is fine
        assert ledger.verify() == []


def copy_database_file_only(path: Path, name: str) -> Path:
    copy = path.with_name(name)
    copy.write_bytes(path.read_bytes())  # what a careless `cp ledger.db backup/` does
    return copy


def test_each_commit_reaches_the_database_file_while_the_writer_is_open(path: Path) -> None:
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)) as ledger:
        ledger.charge(DPSGD, round_id="r1")
        ledger.charge(DPSGD, round_id="r2")
        copy = copy_database_file_only(path, "plain-copy.db")
        assert (path.parent / "site-ledger.db-wal").exists()  # the writer is still open
        with PrivacyLedger.read(copy, public_key=SITE.public(), expected_head=ledger.head()) as restored:
            assert len(restored.entries()) == 3


def test_backup_is_a_verified_snapshot_including_the_write_ahead_log(path: Path) -> None:
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)) as ledger:
        ledger.charge(DPSGD, round_id="r1")
        with sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM entries").fetchone()  # a reader holds the WAL open
            ledger.charge(DPSGD, round_id="r2")  # so this entry stays in the -wal file for now
            plain = copy_database_file_only(path, "plain-copy.db")
            copy = ledger.backup(path.with_name("backup.db"))
            head = ledger.head()
            reader.execute("COMMIT")
        reader.close()
        with PrivacyLedger.read(plain, public_key=SITE.public()) as lossy:
            assert len(lossy.entries()) == 2  # the premise: the database file alone lacks r2
        with pytest.raises(ConfigError, match="already exists"):
            ledger.backup(copy)
    with PrivacyLedger.read(copy, public_key=SITE.public(), expected_head=head) as restored:
        assert [e.round_id for e in restored.entries()] == ["", "r1", "r2"]
    assert sorted(p.name for p in path.parent.iterdir() if ".creating" in p.name) == []
