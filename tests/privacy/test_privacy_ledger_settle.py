"""Settles may only lower the spend within the protocol's bounds, in the writer and the verifier.

Each forbidden settle is tried twice: through ``PrivacyLedger.settle``, which must refuse with a
ConfigError and write nothing, and as a row sealed with the site's real key and written straight
into the table (a buggy or dishonest writer), which the verifier must report as BAD_SETTLE.
Epsilons are checked against dp-accounting's RDP accountant (independent) where it applies.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from securefed.errors import ConfigError
from securefed.primitives.identity import SiteIdentity
from securefed.privacy.accounting import compose_epsilon
from securefed.privacy.events import (
    DistributedDiscreteGaussian,
    PoissonSampledGaussian,
    PrivacyUnit,
    event_from_record,
)
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger, ProblemKind, verify_ledger_file
from securefed.privacy.ledger_codec import COLUMNS, entry_digest
from securefed.privacy.ledger_records import canonical_json, signed_message
from securefed.privacy.ledger_store import LedgerStore

DELTA = 1e-5
SITE = SiteIdentity("hospital-a", bytes(range(32)), bytes(range(32, 64)))
DPSGD = PoissonSampledGaussian(noise_multiplier=1.1, sample_rate=0.01, steps=100)


def ddg(sites: int, cohort: int | None = 6, **changes: object) -> DistributedDiscreteGaussian:
    event = DistributedDiscreteGaussian(l2_sensitivity=64.0, l1_sensitivity=512.0, site_sigma=40.0,
                                        sites=sites, dimension=64, cohort=cohort)
    return dataclasses.replace(event, **changes)


def compose(events: list, accountant: str = "rdp") -> float:
    return compose_epsilon(events, delta=DELTA, accountant=accountant)


def dp_accounting_epsilon(events: list[PoissonSampledGaussian]) -> float:
    accountant = RdpAccountant()
    for event in events:
        gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(event.sample_rate, gaussian), event.steps)
    return accountant.get_epsilon(DELTA)


# Small sigma: tau grows with the number of sites, so 50 sites cost more than 2 (Kairouz et al.'s
# bound is not monotone there). Structurally a fine settle; only the cost check refuses it.
SMALL_SIGMA = {"site_sigma": 0.6, "l2_sensitivity": 5.0, "l1_sensitivity": 40.0}

FORBIDDEN = {
    "more steps": (DPSGD, dataclasses.replace(DPSGD, steps=101)),
    "other noise": (DPSGD, dataclasses.replace(DPSGD, noise_multiplier=1e4, steps=1)),
    "other sample rate": (DPSGD, dataclasses.replace(DPSGD, sample_rate=1e-6)),
    "other unit": (DPSGD, dataclasses.replace(DPSGD, unit=PrivacyUnit.SITE, steps=50)),
    "other mechanism": (ddg(3), DPSGD),
    "fewer sites": (ddg(3), ddg(2)),
    "sites past the cohort": (ddg(3), ddg(7, cohort=7)),
    "cohort raised": (ddg(3), ddg(6, cohort=60)),
    "cohort lowered below the charge": (ddg(3), ddg(2, cohort=2)),
    "no cohort charged": (ddg(3, cohort=None), ddg(4, cohort=None)),
    "cohort added": (ddg(3, cohort=None), ddg(4)),
    "other sigma": (ddg(3), ddg(4, site_sigma=4000.0)),
    "other sensitivity": (ddg(3), ddg(4, l2_sensitivity=1e-3)),
    "other dimension": (ddg(3), ddg(4, dimension=1)),
    "other steps": (ddg(3, steps=2), ddg(4, steps=1)),
    "costs more": (ddg(2, cohort=50, **SMALL_SIGMA), ddg(50, cohort=50, **SMALL_SIGMA)),
}


def files_state(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.parent.iterdir()
            if p.name.startswith(path.name) and not p.name.endswith("-shm")}


def write_signed_row(path: Path, **fields: object) -> None:
    """Append a row sealed with the site's real key, bypassing every check of PrivacyLedger."""
    store = LedgerStore.open(path, writable=True, busy_timeout_s=5.0)
    try:
        last = dict(zip(COLUMNS, store.rows()[-1]))
        row = {"seq": last["seq"] + 1, "kind": "settle", "round_id": "", "event": None,
               "accountant": "rdp", "epsilon_after": 0.0, "delta_after": DELTA,
               "recorded_at": "2026-01-01T00:00:00.000000+00:00", "note": "", "settles": None,
               "genesis": None, "prev_hash": last["entry_hash"]}
        row.update(fields)
        row["entry_hash"] = entry_digest(row)
        row["signature"] = SITE.sign(signed_message(row["seq"], row["entry_hash"]))
        with store.write_transaction():
            store.insert(tuple(row[c] for c in COLUMNS))
    finally:
        store.close()


def test_a_dpsgd_round_that_stopped_early_is_settled_to_the_steps_that_ran(tmp_path: Path) -> None:
    ran = dataclasses.replace(DPSGD, steps=37)
    with PrivacyLedger.create(tmp_path / "l.db", identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)) as ledger:
        first = ledger.charge(DPSGD, round_id="r1")
        second = ledger.charge(DPSGD, round_id="r2")
        settle = ledger.settle(second.seq, ran, note="stopped after 37 steps")
        assert settle.round_id == "r2" and ledger.events() == [DPSGD, ran]
        assert settle.epsilon_after < second.epsilon_after and first.epsilon_after < settle.epsilon_after
        assert math.isclose(settle.epsilon_after, dp_accounting_epsilon([DPSGD, ran]), rel_tol=1e-3)
        assert math.isclose(settle.epsilon_after, compose([DPSGD, ran]), rel_tol=1e-9)
        equal = ledger.settle(first.seq, DPSGD)  # the same steps: allowed, changes nothing
        assert math.isclose(equal.epsilon_after, settle.epsilon_after, rel_tol=1e-12)
    assert verify_ledger_file(tmp_path / "l.db", SITE.public()) == []


def test_a_pld_ledger_settles_fewer_steps_too(tmp_path: Path) -> None:
    ran = dataclasses.replace(DPSGD, steps=60)
    with PrivacyLedger.create(tmp_path / "l.db", identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA),
                              accountant="pld") as ledger:
        ledger.charge(DPSGD, round_id="r1")
        charge = ledger.charge(DPSGD, round_id="r2")
        settle = ledger.settle(charge.seq, ran)
        assert math.isclose(settle.epsilon_after, compose([DPSGD, ran], "pld"), rel_tol=1e-9)
        assert settle.epsilon_after < charge.epsilon_after
    assert verify_ledger_file(tmp_path / "l.db", SITE.public()) == []


def test_a_distributed_round_is_settled_to_the_surviving_sites_within_its_cohort(tmp_path: Path) -> None:
    with PrivacyLedger.create(tmp_path / "l.db", identity=SITE, budget=PrivacyBudget(epsilon=100.0, delta=DELTA)) as ledger:
        charge = ledger.charge(ddg(3), round_id="r1")
        settle = ledger.settle(charge.seq, ddg(6))  # the whole cohort survived
        assert math.isclose(settle.epsilon_after, compose([ddg(6)]), rel_tol=1e-9)
        assert settle.epsilon_after < charge.epsilon_after
        small = ledger.charge(ddg(2, cohort=50, **SMALL_SIGMA), round_id="r2")
        cheaper = ledger.settle(small.seq, ddg(6, cohort=50, **SMALL_SIGMA))  # more sites, lower cost here
        assert cheaper.epsilon_after < small.epsilon_after
    assert verify_ledger_file(tmp_path / "l.db", SITE.public()) == []


@pytest.mark.parametrize("case", sorted(FORBIDDEN))
def test_the_writer_refuses_a_forbidden_settle_and_the_verifier_flags_a_signed_one(tmp_path: Path, case: str) -> None:
    charged, settled = FORBIDDEN[case]
    path = tmp_path / "l.db"
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=100.0, delta=DELTA)) as ledger:
        charge = ledger.charge(charged, round_id="r1")
        before = files_state(path)
        with pytest.raises(ConfigError, match="cannot settle"):
            ledger.settle(charge.seq, settled)
        assert files_state(path) == before and len(ledger.entries()) == 2
    # A writer that skips the rules signs the settle with the real key and records what it claims.
    claimed = compose([settled])
    write_signed_row(path, round_id="r1", event=canonical_json(settled.to_record()), settles=charge.seq,
                     epsilon_after=claimed)
    problems = verify_ledger_file(path, SITE.public())
    assert (ProblemKind.BAD_SETTLE, 2) in {(p.kind, p.seq) for p in problems}
    # Refused, the settle does not count: the charge still stands in the recomputation.
    assert {p.kind for p in problems} <= {ProblemKind.BAD_SETTLE, ProblemKind.SPEND_MISMATCH}


def test_settling_twice_another_round_or_a_non_charge_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=20.0, delta=DELTA)) as ledger:
        charge = ledger.charge(ddg(3), round_id="r1")
        for bad_seq in (0, 99, "1", True):
            with pytest.raises(ConfigError):
                ledger.settle(bad_seq, ddg(4))  # type: ignore[arg-type]
        settle = ledger.settle(charge.seq, ddg(4))
        with pytest.raises(ConfigError, match="already settled"):
            ledger.settle(charge.seq, ddg(5))
        with pytest.raises(ConfigError, match="not a charge"):
            ledger.settle(settle.seq, ddg(5))
        ledger.charge(ddg(3), round_id="r2")
    assert verify_ledger_file(path, SITE.public()) == []
    event = canonical_json(ddg(5).to_record())
    # Second settle of charge 1, recorded as if it replaced the first settle.
    write_signed_row(path, round_id="r1", event=event, settles=charge.seq,
                     epsilon_after=compose([ddg(5), ddg(3)]))
    assert (ProblemKind.BAD_SETTLE, 4) in {(p.kind, p.seq) for p in verify_ledger_file(path, SITE.public())}


def test_a_signed_settle_naming_another_round_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=20.0, delta=DELTA)) as ledger:
        charge = ledger.charge(ddg(3), round_id="r1")
    write_signed_row(path, round_id="r9", event=canonical_json(ddg(4).to_record()), settles=charge.seq,
                     epsilon_after=compose([ddg(4)]))
    problems = {(p.kind, p.seq) for p in verify_ledger_file(path, SITE.public())}
    assert (ProblemKind.BAD_SETTLE, 2) in problems


def test_the_cohort_is_validated_and_round_trips() -> None:
    with pytest.raises(ConfigError, match="cohort"):
        ddg(5, cohort=4)
    with pytest.raises(ConfigError, match="cohort"):
        ddg(5, cohort=10**8)
    record = ddg(5, cohort=9).to_record()
    assert record["cohort"] == 9
    assert "cohort" not in ddg(5, cohort=None).to_record()  # events without one keep their record
    assert event_from_record(record) == ddg(5, cohort=9)
    # The cohort bounds settles only; it is not part of the privacy bound.
    assert ddg(5, cohort=9).rdp(4.0) == ddg(5, cohort=None).rdp(4.0)


def test_a_long_mix_of_charges_and_settles_composes_like_the_plain_event_list(tmp_path: Path) -> None:
    # The ledger keeps a running RDP sum (a settle swaps one term); it must equal composing the
    # effective events from scratch after every entry, and dp-accounting at the end.
    rng = random.Random(2017)
    effective: list[PoissonSampledGaussian] = []
    path = tmp_path / "l.db"
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=100.0, delta=DELTA)) as ledger:
        for i in range(40):
            event = PoissonSampledGaussian(noise_multiplier=rng.choice([0.9, 1.1, 2.0, 5.0]),
                                           sample_rate=rng.choice([0.001, 0.01, 0.03]), steps=rng.randint(1, 200))
            charge = ledger.charge(event, round_id=f"r{i}")
            effective.append(event)
            assert math.isclose(charge.epsilon_after, compose(effective), rel_tol=1e-9)
            if rng.random() < 0.4:
                effective[-1] = dataclasses.replace(event, steps=rng.randint(1, event.steps))
                settle = ledger.settle(charge.seq, effective[-1])
                assert math.isclose(settle.epsilon_after, compose(effective), rel_tol=1e-9)
        assert ledger.events() == effective
        assert math.isclose(ledger.spent().epsilon, dp_accounting_epsilon(effective), rel_tol=1e-3)
    assert verify_ledger_file(path, SITE.public()) == []
