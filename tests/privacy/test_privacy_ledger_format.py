"""The ledger's on-disk format, re-derived independently, and untrusted content that must not crash it.

The known-answer test rebuilds every cell, the entry hash and the Ed25519 signature of a small
ledger with hashlib and PyNaCl from the format documented in ``securefed.privacy.ledger_codec``,
without calling securefed's own hashing. The rest feeds the verifier cells an attacker or a bad
disk could leave (numbers too large for a float, deep nesting, absurd counts, bytes that are not
UTF-8) and checks that each comes back as a named problem, never as a raw exception.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import nacl.signing
import pytest

from securefed.errors import ConfigError, LedgerIntegrityError
from securefed.primitives.identity import SiteIdentity
from securefed.primitives.randomness import SeededRandom
from securefed.privacy.accounting import compose_epsilon
from securefed.privacy.events import MAX_SITES, DistributedDiscreteGaussian, PoissonSampledGaussian
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger, ProblemKind, verify_ledger_file
from securefed.privacy.ledger_codec import COLUMNS, entry_digest
from securefed.privacy.ledger_records import signed_message

DELTA = 1e-5
SITE = SiteIdentity("hospital-a", bytes(range(32)), bytes(range(32, 64)))
DPSGD = PoissonSampledGaussian(noise_multiplier=1.1, sample_rate=0.01, steps=100)


def stored_rows(path: Path) -> list[dict[str, object]]:
    connection = sqlite3.connect(path)
    try:
        found = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM entries ORDER BY seq").fetchall()
    finally:
        connection.close()
    return [dict(zip(COLUMNS, row)) for row in found]


def sql(path: Path, statement: str, *params: object) -> None:
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute(statement, params)
    finally:
        connection.close()


def problems_of(path: Path) -> set[tuple[ProblemKind, int | None]]:
    return {(p.kind, p.seq) for p in verify_ledger_file(path, SITE.public())}


# -- known answer ---------------------------------------------------------------------------------


def documented_payload(row: dict[str, object]) -> bytes:
    payload: dict[str, object] = {"format": "securefed-privacy-ledger", "version": 2}
    for column, value in row.items():
        if isinstance(value, float):
            payload[column] = {"float": value.hex()}
        elif isinstance(value, bytes):
            payload[column] = {"bytes": value.hex()}
        else:
            payload[column] = value
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def test_hashes_and_signatures_follow_the_documented_format(tmp_path: Path) -> None:
    identity = SiteIdentity.generate("kat-site", SeededRandom("kat-identity"))
    signing_key = nacl.signing.SigningKey(SeededRandom("kat-identity").random_bytes(32))
    assert bytes(signing_key.verify_key) == identity.public().verify_key  # generate draws the seed first
    ledger_id = SeededRandom("kat-ledger").random_bytes(16).hex()
    moment = datetime(2026, 2, 3, 4, 5, 6, 789, tzinfo=timezone.utc)
    path = tmp_path / "kat.db"
    with PrivacyLedger.create(path, identity=identity, budget=PrivacyBudget(epsilon=3.0, delta=DELTA),
                              clock=lambda: moment, rng=SeededRandom("kat-ledger")) as ledger:
        ledger.charge(DPSGD, round_id="round-1", note="first")
        head = ledger.head()
    stored = stored_rows(path)
    genesis_text = json.dumps({
        "format": "securefed-privacy-ledger", "format_version": 2, "ledger_id": ledger_id,
        "site": "kat-site", "verify_key": bytes(signing_key.verify_key).hex(),
        "budget": {"epsilon": 3.0, "delta": 1e-05}, "accountant": "rdp",
    }, sort_keys=True, separators=(",", ":"))
    event_text = ('{"kind":"poisson-sampled-gaussian","noise_multiplier":1.1,"sample_rate":0.01,'
                  '"steps":100,"unit":"record"}')
    time_text = "2026-02-03T04:05:06.000789+00:00"
    epsilon = stored[1]["epsilon_after"]
    assert epsilon == pytest.approx(compose_epsilon([DPSGD], delta=DELTA, accountant="rdp"), rel=1e-12)
    expected = [
        {"seq": 0, "kind": "genesis", "round_id": "", "event": None, "accountant": "rdp",
         "epsilon_after": 0.0, "delta_after": 0.0, "recorded_at": time_text, "note": "", "settles": None,
         "genesis": genesis_text, "prev_hash": bytes(32)},
        {"seq": 1, "kind": "charge", "round_id": "round-1", "event": event_text, "accountant": "rdp",
         "epsilon_after": epsilon, "delta_after": DELTA, "recorded_at": time_text, "note": "first",
         "settles": None, "genesis": None, "prev_hash": None},
    ]
    previous = bytes(32)
    for want, got in zip(expected, stored, strict=True):
        want["prev_hash"] = previous
        digest = hashlib.sha256(documented_payload(want)).digest()
        message = b"securefed/privacy-ledger/v2/entry\x00" + want["seq"].to_bytes(8, "big") + digest
        want["entry_hash"], want["signature"] = digest, signing_key.sign(message).signature
        assert got == want
        previous = digest
    assert (head.seq, head.entry_hash, head.signature) == (1, expected[1]["entry_hash"], expected[1]["signature"])


# -- untrusted content ----------------------------------------------------------------------------

_EVENT = '{{"kind":"poisson-sampled-gaussian","noise_multiplier":{z},"sample_rate":0.01,"steps":{steps},"unit":{unit}}}'
HOSTILE_EVENTS = {
    "a 5000-digit int": _EVENT.format(z="1" * 5000, steps=100, unit='"record"'),
    "an int beyond float range": _EVENT.format(z=str(10**400), steps=100, unit='"record"'),
    "NaN noise": _EVENT.format(z="NaN", steps=100, unit='"record"'),
    "deep nesting": "[" * 2000 + "]" * 2000,
    "a list as unit": _EVENT.format(z="1.1", steps=100, unit="[]"),
    "a list as kind": '{"kind":[],"noise_multiplier":1.1}',
    "10**21 steps": _EVENT.format(z="1.1", steps=10**21, unit='"record"'),
    "10**12 sites": ('{"kind":"distributed-discrete-gaussian","l2_sensitivity":1.0,"l1_sensitivity":1.0,'
                     '"site_sigma":1.0,"sites":1000000000000,"dimension":1,"steps":1,"unit":"site"}'),
    "a cohort below its sites": ('{"kind":"distributed-discrete-gaussian","l2_sensitivity":1.0,"l1_sensitivity":1.0,'
                                 '"site_sigma":1.0,"sites":5,"dimension":1,"steps":1,"unit":"site","cohort":2}'),
}


@pytest.fixture
def small_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)) as ledger:
        ledger.charge(DPSGD, round_id="r1")
    return path


def append_signed(path: Path, **fields: object) -> int:
    """Append a row sealed with the site's real key (as a buggy writer would), return its seq."""
    last = stored_rows(path)[-1]
    row = dict(last, seq=last["seq"] + 1, prev_hash=last["entry_hash"], round_id="r2", **fields)
    row["entry_hash"] = entry_digest(row)
    row["signature"] = SITE.sign(signed_message(row["seq"], row["entry_hash"]))
    sql(path, f"INSERT INTO entries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        *(row[c] for c in COLUMNS))
    return row["seq"]


@pytest.mark.parametrize("case", sorted(HOSTILE_EVENTS))
def test_a_hostile_event_is_a_named_problem_whether_edited_or_signed(small_ledger: Path, case: str) -> None:
    pristine = small_ledger.read_bytes()
    sql(small_ledger, "UPDATE entries SET event = ? WHERE seq = 1", HOSTILE_EVENTS[case])
    assert problems_of(small_ledger) == {(ProblemKind.HASH_MISMATCH, 1)}  # never decoded
    with pytest.raises(LedgerIntegrityError):
        PrivacyLedger.open(small_ledger, identity=SITE)
    small_ledger.write_bytes(pristine)
    seq = append_signed(small_ledger, event=HOSTILE_EVENTS[case])
    assert problems_of(small_ledger) == {(ProblemKind.MALFORMED_ENTRY, seq)}
    with pytest.raises(LedgerIntegrityError, match="failed verification"):
        PrivacyLedger.read(small_ledger, public_key=SITE.public())


@pytest.mark.parametrize("genesis", [
    "[" * 2000 + "]" * 2000,
    "BUDGET",
    "ACCOUNTANT",
])
def test_a_hostile_but_signed_genesis_record_is_a_named_problem(tmp_path: Path, genesis: str) -> None:
    path = tmp_path / "ledger.db"
    PrivacyLedger.create(path, identity=SITE, budget=PrivacyBudget(epsilon=5.0, delta=DELTA)).close()
    text = stored_rows(path)[0]["genesis"]
    if genesis == "BUDGET":
        genesis = text.replace('"epsilon":5.0', f'"epsilon":{10**400}')
    elif genesis == "ACCOUNTANT":
        genesis = text.replace('"accountant":"rdp"', '"accountant":[[]]')
    assert genesis != text
    row = dict(stored_rows(path)[0], genesis=genesis)
    row["entry_hash"] = entry_digest(row)
    row["signature"] = SITE.sign(signed_message(0, row["entry_hash"]))
    sql(path, "UPDATE entries SET genesis = ?, entry_hash = ?, signature = ? WHERE seq = 0",
        row["genesis"], row["entry_hash"], row["signature"])
    assert problems_of(path) == {(ProblemKind.MALFORMED_ENTRY, 0)}


@pytest.mark.parametrize("column", ["kind", "round_id", "event", "accountant", "recorded_at", "note", "genesis"])
def test_text_that_is_not_utf8_is_a_hash_mismatch_of_its_entry(small_ledger: Path, column: str) -> None:
    seq = 0 if column == "genesis" else 1
    sql(small_ledger, f"UPDATE entries SET {column} = CAST(X'7bff' AS TEXT) WHERE seq = ?", seq)
    problems = verify_ledger_file(small_ledger, SITE.public())
    assert {(p.kind, p.seq) for p in problems} == {(ProblemKind.HASH_MISMATCH, seq)}
    assert "UTF-8" in problems[0].message
    with pytest.raises(LedgerIntegrityError, match="UTF-8"):
        PrivacyLedger.read(small_ledger, public_key=SITE.public())


def test_an_oversized_text_cell_is_not_read_as_an_entry(small_ledger: Path) -> None:
    seq = append_signed(small_ledger, note="x" * 100_000)
    problems = verify_ledger_file(small_ledger, SITE.public())
    assert {(p.kind, p.seq) for p in problems} == {(ProblemKind.MALFORMED_ENTRY, seq)}
    assert "characters long" in problems[0].message


def test_a_schema_name_that_is_not_utf8_means_not_a_ledger(small_ledger: Path) -> None:
    connection = sqlite3.connect(small_ledger)
    connection.execute("PRAGMA writable_schema = ON")
    connection.execute("UPDATE sqlite_master SET name = CAST(X'656e7472ff' AS TEXT), "
                       "tbl_name = CAST(X'656e7472ff' AS TEXT)")
    connection.commit()
    connection.close()
    assert [p.kind for p in verify_ledger_file(small_ledger, SITE.public())] == [ProblemKind.NOT_A_LEDGER]
    with pytest.raises(LedgerIntegrityError):
        PrivacyLedger.open(small_ledger, identity=SITE)


def test_unsigned_junk_rows_cost_one_report_each_and_no_recomputation(small_ledger: Path) -> None:
    junk = stored_rows(small_ledger)[1]
    rows = []
    for seq in range(2, 402):
        event = json.dumps({"kind": "poisson-sampled-gaussian", "noise_multiplier": 1000.0 + seq,
                            "sample_rate": 0.001, "steps": 1, "unit": "record"})
        row = dict(junk, seq=seq, event=event, prev_hash=bytes(32), entry_hash=bytes(32), signature=bytes(64))
        rows.append(tuple(row[c] for c in COLUMNS))
    connection = sqlite3.connect(small_ledger)
    with connection:  # one transaction: one sync, not 400
        connection.executemany(
            f"INSERT INTO entries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows)
    connection.close()
    problems = verify_ledger_file(small_ledger, SITE.public())
    kinds = {p.kind for p in problems}
    assert kinds == {ProblemKind.BROKEN_CHAIN, ProblemKind.HASH_MISMATCH, ProblemKind.BAD_SIGNATURE}
    assert len(problems) <= 3 * 400


def _tau_by_definition(sites: int, sigma: float) -> float:
    # Kairouz, Liu and Steinke (2021): tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)).
    return 10.0 * math.fsum(math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, sites))


def test_tau_is_exact_for_small_sums_and_a_cheap_upper_bound_for_huge_ones() -> None:
    def event(sites: int) -> DistributedDiscreteGaussian:
        return DistributedDiscreteGaussian(l2_sensitivity=1.0, l1_sensitivity=1.0, site_sigma=0.5,
                                           sites=sites, dimension=1)

    for sites in (1, 2, 50, 100_001):
        assert math.isclose(event(sites).tau(), _tau_by_definition(sites, 0.5), rel_tol=1e-12)
    exact = _tau_by_definition(300_000, 0.5)
    assert exact <= event(300_000).tau() <= exact * (1 + 1e-4)  # an upper bound, and a tight one
    assert event(MAX_SITES).tau() >= event(300_000).tau()
    with pytest.raises(ConfigError, match="sites"):
        event(MAX_SITES + 1)
