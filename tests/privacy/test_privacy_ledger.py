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


def ddg(sites: int) -> DistributedDiscreteGaussian:
    return DistributedDiscreteGaussian(l2_sensitivity=64.0, l1_sensitivity=512.0, site_sigma=40.0,
                                       sites=sites, dimension=64)


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


def test_settle_replaces_the_worst_case_charge_and_is_never_refused(path: Path) -> None:
    worst, actual, costlier = ddg(3), ddg(8), ddg(1)
    budget = PrivacyBudget(epsilon=(compose([worst]) + compose([worst, worst])) / 2, delta=DELTA)
    assert compose([costlier]) > budget.epsilon  # premise: settling to one site overspends
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
        # Settling for more than was charged is recorded all the same: never under-count.
        over = ledger.settle(second.seq, costlier)
        assert over.epsilon_after > budget.epsilon
        assert math.isclose(over.epsilon_after, compose([actual, costlier]), rel_tol=1e-9)
        with pytest.raises(PrivacyBudgetExceeded):
            ledger.charge(TINY, round_id="round-3")
    problems = verify_ledger_file(path, SITE.public())
    assert problems == []  # a settle over budget is legitimate, not a problem


def test_settle_refuses_what_is_not_an_unsettled_charge_of_the_same_mechanism(path: Path) -> None:
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=10.0, delta=DELTA)) as ledger:
        charge = ledger.charge(ddg(3), round_id="r1")
        for bad_seq in (0, 99, "1"):
            with pytest.raises(ConfigError):
                ledger.settle(bad_seq, ddg(4))  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="cannot be settled with a poisson"):
            ledger.settle(charge.seq, DPSGD)
        settle = ledger.settle(charge.seq, ddg(4))
        with pytest.raises(ConfigError, match="already settled"):
            ledger.settle(charge.seq, ddg(5))
        with pytest.raises(ConfigError):
            ledger.settle(settle.seq, ddg(5))
        assert len(ledger.entries()) == 3


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
        connection.execute("PRAGMA user_version = 1")
        connection.execute("CREATE TRIGGER keep_quiet AFTER INSERT ON entries BEGIN DELETE FROM entries; END")
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
