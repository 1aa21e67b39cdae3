"""Checking a privacy ledger's rows in order, each against everything before it.

:class:`ChainVerifier` consumes rows in sequence order and checks, for every row: that its
sequence number follows the previous one, that it links to the previous row's hash, that its
content still matches its hash, that the caller's trusted key signed it, that it decodes, that it
agrees with the genesis entry (accountant, delta), that a settle names an earlier unsettled
charge of the same mechanism, and that the epsilon it records is what its events compose to. A
charge that took the spend past the budget is reported too: the writer must refuse those.

A writer keeps one verifier over the rows it has seen, so each charge re-checks only what other
writers appended since; :meth:`PrivacyLedger.verify` runs a fresh one over the whole file.

Recomputing the spend per entry composes the effective events (charges, each replaced by its
settle if any) with :func:`compose_epsilon` at the budget's delta. Identical events are merged
first by adding their steps: k runs of a mechanism are its k-fold composition (Mironov 2017
for RDP; Koskela et al. 2020 and Doroshenko et al. 2022 for privacy loss distributions), so the
result changes only by rounding, while a long ledger of identical rounds costs one composition
of a few distinct mechanisms per entry instead of one over the whole history.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

from ..errors import InvalidSignatureError, LedgerIntegrityError, PrivacyError
from ..primitives.identity import PublicIdentity
from .accounting import AccountantKind, compose_epsilon
from .events import PrivacyEvent
from .ledger_records import (
    COLUMNS,
    GENESIS_PREV_HASH,
    EntryKind,
    LedgerEntry,
    LedgerGenesis,
    LedgerHead,
    LedgerProblem,
    PrivacySpend,
    ProblemKind,
    decode_entry,
    entry_digest,
    signed_message,
    within_budget,
)

__all__ = ["ChainVerifier", "merge_identical_events", "compose_effective"]

_Report = Callable[[ProblemKind, str], None]

# A recorded epsilon must match the recomputation up to rounding; a site that under-reports by
# more than this is caught.
_SPEND_RELATIVE_TOLERANCE = 1e-9


def merge_identical_events(events: Sequence[PrivacyEvent]) -> tuple[PrivacyEvent, ...]:
    """Merge events that differ only in ``steps`` into one with the steps added, in first-seen order."""
    steps: dict[PrivacyEvent, int] = {}
    for event in events:
        key = dataclasses.replace(event, steps=1)
        steps[key] = steps.get(key, 0) + event.steps
    return tuple(dataclasses.replace(key, steps=total) for key, total in steps.items())


@functools.lru_cache(maxsize=512)
def _compose_merged(events: tuple[PrivacyEvent, ...], delta: float, accountant: AccountantKind) -> float:
    return float(compose_epsilon(list(events), delta=delta, accountant=accountant))


def compose_effective(events: Sequence[PrivacyEvent], *, delta: float, accountant: AccountantKind) -> float:
    """Epsilon of ``events`` composed at ``delta``; 0 for none."""
    if not events:
        return 0.0
    return _compose_merged(merge_identical_events(events), delta, accountant)


class ChainVerifier:
    """Feeds on ledger rows in order and reports every problem with each."""

    def __init__(self, public_key: PublicIdentity) -> None:
        self.public_key = public_key
        self.genesis: LedgerGenesis | None = None
        self.entries: list[LedgerEntry] = []
        self._hash_by_seq: dict[int, bytes] = {}
        # charge seq -> the event counted for it now: the charged one, or its settlement
        self._in_force: dict[int, PrivacyEvent] = {}
        self._settled_by: dict[int, int] = {}
        self._next_seq = 0
        self._prev_hash: object = GENESIS_PREV_HASH
        self._last: tuple[int, bytes, bytes] | None = None
        self._rows = 0
        self._recomputable = True
        self._reported_missing_genesis = False

    # -- reading state -------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return self._rows

    def effective_events(self) -> list[PrivacyEvent]:
        return list(self._in_force.values())

    def spent(self) -> PrivacySpend:
        if not self.entries:
            return PrivacySpend(epsilon=0.0, delta=0.0)
        return self.entries[-1].spend_after

    def head(self) -> LedgerHead | None:
        if self._last is None:
            return None
        seq, entry_hash, signature = self._last
        return LedgerHead(seq=seq, entry_hash=entry_hash, signature=signature)

    def last_hash(self) -> bytes:
        return self._last[1] if self._last else GENESIS_PREV_HASH

    def compose(self, events: Sequence[PrivacyEvent]) -> float:
        genesis = self._require_genesis()
        return compose_effective(events, delta=genesis.budget.delta, accountant=genesis.accountant)

    def epsilon_if(self, *, add: PrivacyEvent | None = None,
                   settle: tuple[int, PrivacyEvent] | None = None) -> float:
        """Epsilon after adding a charge for ``add`` or settling ``settle = (charge seq, event)``."""
        in_force = dict(self._in_force)
        if settle is not None:
            in_force[settle[0]] = settle[1]
        events = list(in_force.values()) + ([add] if add is not None else [])
        return self.compose(events)

    def settle_refusal(self, charge_seq: object, event: PrivacyEvent, round_id: str | None = None) -> str | None:
        """Why settling ``charge_seq`` with ``event`` is not allowed, or None if it is."""
        if isinstance(charge_seq, bool) or not isinstance(charge_seq, int):
            return f"a settle must name the sequence number of a charge, got {charge_seq!r}"
        if charge_seq not in self._in_force:
            return f"entry {charge_seq} is not a charge in this ledger, so it cannot be settled"
        if charge_seq in self._settled_by:
            return f"charge {charge_seq} was already settled by entry {self._settled_by[charge_seq]}"
        charge = self._entry(charge_seq)
        charged = charge.event
        if (event.kind, event.unit) != (charged.kind, charged.unit):
            return (
                f"charge {charge_seq} was for a {charged.kind.value} mechanism per {charged.unit.value}; "
                f"it cannot be settled with a {event.kind.value} per {event.unit.value}"
            )
        if round_id is not None and round_id != charge.round_id:
            return f"the settle's round id {round_id!r} differs from charge {charge_seq}'s {charge.round_id!r}"
        return None

    def charge_entry(self, seq: int) -> LedgerEntry | None:
        entry = self._entry(seq)
        return entry if entry is not None and entry.kind is EntryKind.CHARGE else None

    # -- checking ------------------------------------------------------------------------------

    def feed(self, row: Sequence[object]) -> list[LedgerProblem]:
        """Check the next row and take it into the state; return its problems."""
        values = dict(zip(COLUMNS, row, strict=True))
        raw_seq = values["seq"]
        seq = raw_seq if isinstance(raw_seq, int) and not isinstance(raw_seq, bool) else None
        problems: list[LedgerProblem] = []

        def report(kind: ProblemKind, message: str) -> None:
            problems.append(LedgerProblem(kind=kind, message=f"entry {seq}: {message}", seq=seq))

        self._rows += 1
        if seq is not None and seq > self._next_seq:
            gap = (f"entry {self._next_seq} is" if seq == self._next_seq + 1
                   else f"entries {self._next_seq} to {seq - 1} are")
            report(ProblemKind.SEQUENCE, f"{gap} missing before it: entries were deleted")
        elif seq is not None and seq < self._next_seq:
            report(ProblemKind.SEQUENCE, f"out of order: entry {self._next_seq} was expected here")
        stored_hash = values["entry_hash"]
        if values["prev_hash"] != self._prev_hash:
            report(ProblemKind.BROKEN_CHAIN,
                   "does not link to the entry before it (its prev_hash is not that entry's hash): "
                   "an entry was deleted, inserted or reordered")
        if entry_digest(values) != stored_hash:
            report(ProblemKind.HASH_MISMATCH, "its content was changed after it was signed")
        if not self._signature_ok(seq, stored_hash, values["signature"]):
            report(ProblemKind.BAD_SIGNATURE,
                   f"not signed by site {self.public_key.name!r} "
                   f"(verify key {self.public_key.verify_key.hex()[:16]}...)")
        entry, reasons = decode_entry(values)
        for reason in reasons:
            report(ProblemKind.MALFORMED_ENTRY, reason)

        self._next_seq = (seq if seq is not None else self._next_seq) + 1
        self._prev_hash = stored_hash
        if seq is not None and isinstance(stored_hash, bytes):
            self._hash_by_seq[seq] = stored_hash
            if isinstance(values["signature"], bytes):
                self._last = (seq, stored_hash, values["signature"])
        if entry is None:
            self._recomputable = False
            return problems
        self._check_meaning(entry, report)
        self.entries.append(entry)
        return problems

    def finish(self) -> list[LedgerProblem]:
        """Problems only visible at the end of the rows (an empty ledger)."""
        if self._rows == 0:
            return [LedgerProblem(kind=ProblemKind.MISSING_GENESIS,
                                  message="the ledger has no entries, not even its genesis entry")]
        return []

    def check_head(self, expected: LedgerHead) -> list[LedgerProblem]:
        """Compare the rows seen with a checkpoint the site signed earlier."""
        problems: list[LedgerProblem] = []
        try:
            expected.verify(self.public_key)
        except LedgerIntegrityError as error:
            problems.append(LedgerProblem(kind=ProblemKind.HEAD_MISMATCH, message=str(error), seq=expected.seq))
        last_seq = self._last[0] if self._last else -1
        if expected.seq > last_seq:
            problems.append(LedgerProblem(
                kind=ProblemKind.TRUNCATED, seq=expected.seq,
                message=f"the ledger ends at entry {last_seq} but the checkpoint names entry "
                        f"{expected.seq}: entries were cut off its end (or this is an older copy)",
            ))
        elif self._hash_by_seq.get(expected.seq) != expected.entry_hash:
            problems.append(LedgerProblem(
                kind=ProblemKind.HEAD_MISMATCH, seq=expected.seq,
                message=f"entry {expected.seq} differs from the checkpoint: the history up to it "
                        "was rewritten",
            ))
        return problems

    # -- internals -----------------------------------------------------------------------------

    def _require_genesis(self) -> LedgerGenesis:
        if self.genesis is None:
            raise LedgerIntegrityError("the ledger has no valid genesis entry")
        return self.genesis

    def _entry(self, seq: int) -> LedgerEntry | None:
        # Entries are appended in seq order on a valid chain, so try the direct index first.
        if 0 <= seq < len(self.entries) and self.entries[seq].seq == seq:
            return self.entries[seq]
        return next((e for e in self.entries if e.seq == seq), None)

    def _signature_ok(self, seq: int | None, entry_hash: object, signature: object) -> bool:
        if seq is None or seq < 0 or not isinstance(entry_hash, bytes) or not isinstance(signature, bytes):
            return False
        try:
            self.public_key.verify(signed_message(seq, entry_hash), signature)
        except InvalidSignatureError:
            return False
        return True

    def _check_meaning(self, entry: LedgerEntry, report: _Report) -> None:
        if entry.kind is EntryKind.GENESIS:
            self._check_genesis(entry, report)
            return
        if entry.seq == 0:
            report(ProblemKind.MISSING_GENESIS, f"entry 0 is a {entry.kind.value}, not the genesis entry")
        if self.genesis is None:
            if not self._reported_missing_genesis and entry.seq != 0:
                report(ProblemKind.MISSING_GENESIS,
                       "the ledger has no genesis entry, so its budget and accountant are unknown")
            self._reported_missing_genesis = True
            self._recomputable = False
            return
        genesis = self.genesis
        if entry.genesis is not None:
            report(ProblemKind.INCONSISTENT_ENTRY, f"a {entry.kind.value} entry carries a genesis record")
        if entry.accountant is not genesis.accountant:
            report(ProblemKind.INCONSISTENT_ENTRY,
                   f"uses accountant {entry.accountant.value!r} but the ledger's is {genesis.accountant.value!r}")
        if entry.event is None:
            report(ProblemKind.MALFORMED_ENTRY, f"a {entry.kind.value} entry records no event")
            self._recomputable = False
            return
        if entry.kind is EntryKind.CHARGE:
            if entry.settles is not None:
                report(ProblemKind.INCONSISTENT_ENTRY, "a charge entry must not name a charge it settles")
            self._in_force[entry.seq] = entry.event
        else:
            refusal = self.settle_refusal(entry.settles, entry.event, entry.round_id)
            if refusal is not None:
                report(ProblemKind.BAD_SETTLE, refusal)
            else:
                self._in_force[entry.settles] = entry.event
                self._settled_by[entry.settles] = entry.seq
        self._check_spend(entry, genesis, report)

    def _check_genesis(self, entry: LedgerEntry, report: _Report) -> None:
        if entry.seq != 0 or self.genesis is not None:
            report(ProblemKind.INCONSISTENT_ENTRY, "only entry 0 may be a genesis entry")
            return
        genesis = entry.genesis
        if genesis is None:
            report(ProblemKind.BAD_GENESIS, "the genesis entry has no genesis record")
            self._recomputable = False
            return
        self.genesis = genesis
        if genesis.verify_key != self.public_key.verify_key:
            report(ProblemKind.WRONG_KEY,
                   f"the ledger was created for verify key {genesis.verify_key.hex()[:16]}... (site "
                   f"{genesis.site!r}), not the trusted key {self.public_key.verify_key.hex()[:16]}... "
                   f"of site {self.public_key.name!r}: it belongs to another site or was re-signed")
        if entry.event is not None or entry.settles is not None or entry.round_id:
            report(ProblemKind.BAD_GENESIS, "the genesis entry must not record an event, round or settle")
        if entry.accountant is not genesis.accountant:
            report(ProblemKind.BAD_GENESIS, "the genesis entry's accountant differs from its record")
        if entry.epsilon_after != 0.0 or entry.delta_after != 0.0:
            report(ProblemKind.SPEND_MISMATCH, "the genesis entry must record a spend of zero")

    def _check_spend(self, entry: LedgerEntry, genesis: LedgerGenesis, report: _Report) -> None:
        recorded = entry.epsilon_after
        if entry.delta_after != genesis.budget.delta:
            report(ProblemKind.SPEND_MISMATCH,
                   f"records delta {entry.delta_after!r} but the ledger spends at the budget's "
                   f"delta {genesis.budget.delta!r}")
        expected = None
        if self._recomputable:
            try:
                expected = self.compose(self.effective_events())
            except (PrivacyError, ValueError, ArithmeticError) as error:
                report(ProblemKind.UNCOMPUTABLE, f"the spend cannot be recomputed: {error}")
                self._recomputable = False
        if expected is not None and not math.isclose(
            recorded, expected, rel_tol=_SPEND_RELATIVE_TOLERANCE, abs_tol=1e-12
        ):
            report(ProblemKind.SPEND_MISMATCH,
                   f"records epsilon {recorded!r} but its events compose to {expected!r} "
                   f"({genesis.accountant.value} accountant at delta {genesis.budget.delta!r})")
        worst = recorded if expected is None else max(recorded, expected)
        if entry.kind is EntryKind.CHARGE and not within_budget(worst, genesis.budget):
            report(ProblemKind.OVER_BUDGET,
                   f"this charge took epsilon to {worst!r}, over the budget of "
                   f"{genesis.budget.epsilon!r}; it should have been refused")
