"""Checking a privacy ledger's rows in order, each against everything before it.

:class:`ChainVerifier` consumes rows in sequence order and checks, for every row: that its
sequence number follows the previous one, that it links to the previous row's hash, that its
content still matches its hash and that the caller's trusted key signed it. A row failing either
of the last two is untrusted content: it is reported and never decoded further. Every other row
is decoded and checked against the genesis entry (accountant, delta); a settle must satisfy the
rules of :mod:`.ledger_settle`; the epsilon each entry records must be what its events compose
to; and a charge that took the spend past the budget is reported too, since the writer must
refuse those.

After the first integrity failure (a gap, a broken link, an edited or unsigned or undecodable
row) the events in force are no longer known, so recorded epsilons are no longer recomputed:
one edit yields one report, not one per later entry, and a file of junk rows costs one hash and
one signature check per row.

A writer keeps one verifier over the rows it has seen, so each charge re-checks only what other
writers appended since; :meth:`PrivacyLedger.verify` runs a fresh one over the whole file.
Spends are composed incrementally by :class:`.ledger_compose.SpendComposer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..errors import ConfigError, InvalidSignatureError, LedgerIntegrityError, PrivacyError
from ..primitives.identity import PublicIdentity
from .events import PrivacyEvent
from .ledger_codec import decode_entry, decode_text_cells, entry_digest
from .ledger_compose import SpendComposer
from .ledger_records import (
    GENESIS_PREV_HASH,
    EntryKind,
    LedgerEntry,
    LedgerGenesis,
    LedgerHead,
    LedgerProblem,
    PrivacyBudget,
    PrivacySpend,
    ProblemKind,
    signed_message,
    within_budget,
)
from .ledger_settle import settle_rule_violation

__all__ = ["ChainVerifier"]

_Report = Callable[[ProblemKind, str], None]
_ACCOUNTING_ERRORS = (PrivacyError, ValueError, ArithmeticError)

# A recorded epsilon must match the recomputation up to rounding; a site that under-reports by
# more than this is caught.
_SPEND_RELATIVE_TOLERANCE = 1e-9


class ChainVerifier:
    """Feeds on ledger rows in order and reports every problem with each."""

    def __init__(self, public_key: PublicIdentity) -> None:
        self.public_key = public_key
        self.genesis: LedgerGenesis | None = None
        self.entries: list[LedgerEntry] = []
        self._composer: SpendComposer | None = None
        self._charges: dict[int, LedgerEntry] = {}
        self._settled_by: dict[int, int] = {}
        self._hash_by_seq: dict[int, bytes] = {}
        self._next_seq = 0
        self._prev_hash: object = GENESIS_PREV_HASH
        self._last: tuple[int, bytes, bytes] | None = None
        self._rows = 0
        self._intact = True  # no integrity failure so far: spends are recomputed

    # -- reading state -------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return self._rows

    def effective_events(self) -> list[PrivacyEvent]:
        return self._composer.events() if self._composer is not None else []

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

    def epsilon_if(self, *, add: PrivacyEvent | None = None,
                   settle: tuple[int, PrivacyEvent] | None = None) -> float:
        """Epsilon after adding a charge for ``add`` or settling ``settle = (charge seq, event)``."""
        return self._require_composer().epsilon_if(add=add, settle=settle)

    def settle_refusal(self, charge_seq: object, event: PrivacyEvent, round_id: str | None = None) -> str | None:
        """Why settling ``charge_seq`` with ``event`` is not allowed, or None if it is."""
        if isinstance(charge_seq, bool) or not isinstance(charge_seq, int):
            return f"a settle must name the sequence number of a charge, got {charge_seq!r}"[:200]
        charge = self._charges.get(charge_seq)
        if charge is None:
            return f"entry {charge_seq} is not a charge in this ledger, so it cannot be settled"
        if charge_seq in self._settled_by:
            return f"charge {charge_seq} was already settled by entry {self._settled_by[charge_seq]}"
        if round_id is not None and round_id != charge.round_id:
            return f"the settle's round id {round_id!r} differs from charge {charge_seq}'s {charge.round_id!r}"
        violation = settle_rule_violation(charge.event, event)
        if violation is None:
            try:
                violation = self._require_composer().settle_cost_violation(charge_seq, event)
            except _ACCOUNTING_ERRORS as error:
                violation = f"its cost cannot be computed ({error})"
        if violation is not None:
            return f"charge {charge_seq} cannot be settled with that {type(event).__name__}: {violation}"
        return None

    def charge_entry(self, seq: int) -> LedgerEntry | None:
        return self._charges.get(seq)

    # -- checking ------------------------------------------------------------------------------

    def feed(self, row: Sequence[object]) -> list[LedgerProblem]:
        """Check the next stored row (text cells as bytes or str) and take it in; return its problems."""
        values, unreadable = decode_text_cells(row)
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
        hash_ok = not unreadable and entry_digest(values) == stored_hash
        if not hash_ok:
            why = f" ({'; '.join(unreadable)})" if unreadable else ""
            report(ProblemKind.HASH_MISMATCH, f"its content was changed after it was signed{why}")
        signature_ok = self._signature_ok(seq, stored_hash, values["signature"])
        if not signature_ok:
            if seq == 0 and hash_ok:
                self._diagnose_foreign_genesis(values["genesis"], report)
            report(ProblemKind.BAD_SIGNATURE,
                   f"not signed by site {self.public_key.name!r} "
                   f"(verify key {self.public_key.verify_key.hex()[:16]}...)")

        self._next_seq = (seq if seq is not None else self._next_seq) + 1
        self._prev_hash = stored_hash
        if seq is not None and isinstance(stored_hash, bytes):
            self._hash_by_seq[seq] = stored_hash
            if isinstance(values["signature"], bytes):
                self._last = (seq, stored_hash, values["signature"])
        if problems:
            self._intact = False
        if not (hash_ok and signature_ok):
            return problems  # untrusted content: never decode it
        entry, reasons = decode_entry(values)
        for reason in reasons:
            report(ProblemKind.MALFORMED_ENTRY, reason)
        if entry is None:
            self._intact = False
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
                        f"{expected.seq}: entries were cut off its end, or this is an older copy",
            ))
        elif self._hash_by_seq.get(expected.seq) != expected.entry_hash:
            problems.append(LedgerProblem(
                kind=ProblemKind.HEAD_MISMATCH, seq=expected.seq,
                message=f"entry {expected.seq} differs from the checkpoint: the history up to it "
                        "was rewritten, or this is another ledger",
            ))
        return problems

    def check_expected(self, *, ledger_id: str | None = None,
                       budget: PrivacyBudget | None = None) -> list[LedgerProblem]:
        """Compare the genesis entry with the ledger id and budget the caller knows this site uses."""
        genesis = self.genesis
        if genesis is None:
            return []  # already reported as a missing or bad genesis entry
        problems: list[str] = []
        if ledger_id is not None and genesis.ledger_id != ledger_id:
            problems.append(f"this is ledger {genesis.ledger_id}, not the expected ledger {ledger_id}: "
                            "the file was replaced with another ledger of the site")
        if budget is not None and genesis.budget != budget:
            problems.append(f"the ledger's budget is epsilon={genesis.budget.epsilon!r}, delta="
                            f"{genesis.budget.delta!r}, not the expected epsilon={budget.epsilon!r}, "
                            f"delta={budget.delta!r}")
        return [LedgerProblem(kind=ProblemKind.LEDGER_MISMATCH, message=m, seq=0) for m in problems]

    # -- internals -----------------------------------------------------------------------------

    def _require_composer(self) -> SpendComposer:
        if self._composer is None:
            raise LedgerIntegrityError("the ledger has no valid genesis entry")
        return self._composer

    def _signature_ok(self, seq: int | None, entry_hash: object, signature: object) -> bool:
        if seq is None or not 0 <= seq < 2**63 or not isinstance(entry_hash, bytes) \
                or not isinstance(signature, bytes):
            return False
        try:
            self.public_key.verify(signed_message(seq, entry_hash), signature)
        except InvalidSignatureError:
            return False
        return True

    def _diagnose_foreign_genesis(self, text: object, report: _Report) -> None:
        """Say whose ledger this is when its intact genesis entry is signed by another key."""
        try:
            genesis = LedgerGenesis.from_json(text)
        except (ConfigError, ValueError, TypeError, RecursionError, MemoryError):
            return
        if genesis.verify_key != self.public_key.verify_key:
            report(ProblemKind.WRONG_KEY,
                   f"the ledger was created for verify key {genesis.verify_key.hex()[:16]}... (site "
                   f"{genesis.site!r}), not the trusted key {self.public_key.verify_key.hex()[:16]}... "
                   f"of site {self.public_key.name!r}: it belongs to another site or was re-signed")

    def _check_meaning(self, entry: LedgerEntry, report: _Report) -> None:
        if entry.kind is EntryKind.GENESIS:
            self._check_genesis(entry, report)
            return
        if entry.seq == 0:
            report(ProblemKind.MISSING_GENESIS, f"entry 0 is a {entry.kind.value}, not the genesis entry")
        composer = self._composer
        if self.genesis is None or composer is None:
            if self._intact and entry.seq != 0:  # (a bad genesis entry was reported already)
                report(ProblemKind.MISSING_GENESIS,
                       "the ledger has no genesis entry, so its budget and accountant are unknown")
            self._intact = False
            return
        genesis = self.genesis
        if entry.genesis is not None:
            report(ProblemKind.INCONSISTENT_ENTRY, f"a {entry.kind.value} entry carries a genesis record")
        if entry.accountant is not genesis.accountant:
            report(ProblemKind.INCONSISTENT_ENTRY,
                   f"uses accountant {entry.accountant.value!r} but the ledger's is {genesis.accountant.value!r}")
        if entry.event is None:
            report(ProblemKind.MALFORMED_ENTRY, f"a {entry.kind.value} entry records no event")
            self._intact = False
            return
        if entry.kind is EntryKind.CHARGE:
            if entry.settles is not None:
                report(ProblemKind.INCONSISTENT_ENTRY, "a charge entry must not name a charge it settles")
            try:
                composer.charge(entry.seq, entry.event)
                self._charges[entry.seq] = entry
            except _ACCOUNTING_ERRORS as error:
                report(ProblemKind.UNCOMPUTABLE, f"the spend cannot be recomputed: {error}")
                self._intact = False
        else:
            refusal = self.settle_refusal(entry.settles, entry.event, entry.round_id)
            if refusal is None:
                composer.settle(entry.settles, entry.event)
                self._settled_by[entry.settles] = entry.seq
            elif self._intact or entry.settles in self._charges:
                # (A settle of a charge lost in an already-reported broken stretch says nothing new.)
                report(ProblemKind.BAD_SETTLE, refusal)
        self._check_spend(entry, genesis, composer, report)

    def _check_genesis(self, entry: LedgerEntry, report: _Report) -> None:
        if entry.seq != 0 or self.genesis is not None:
            report(ProblemKind.INCONSISTENT_ENTRY, "only entry 0 may be a genesis entry")
            return
        genesis = entry.genesis
        if genesis is None:
            report(ProblemKind.BAD_GENESIS, "the genesis entry has no genesis record")
            self._intact = False
            return
        self.genesis = genesis
        self._composer = SpendComposer(accountant=genesis.accountant, delta=genesis.budget.delta)
        if genesis.verify_key != self.public_key.verify_key:
            report(ProblemKind.WRONG_KEY,
                   f"the ledger was created for verify key {genesis.verify_key.hex()[:16]}..., not the "
                   f"trusted key {self.public_key.verify_key.hex()[:16]}... that signed it")
        if entry.event is not None or entry.settles is not None or entry.round_id:
            report(ProblemKind.BAD_GENESIS, "the genesis entry must not record an event, round or settle")
        if entry.accountant is not genesis.accountant:
            report(ProblemKind.BAD_GENESIS, "the genesis entry's accountant differs from its record")
        if entry.epsilon_after != 0.0 or entry.delta_after != 0.0:
            report(ProblemKind.SPEND_MISMATCH, "the genesis entry must record a spend of zero")

    def _check_spend(self, entry: LedgerEntry, genesis: LedgerGenesis, composer: SpendComposer,
                     report: _Report) -> None:
        recorded = entry.epsilon_after
        if entry.delta_after != genesis.budget.delta:
            report(ProblemKind.SPEND_MISMATCH,
                   f"records delta {entry.delta_after!r} but the ledger spends at the budget's "
                   f"delta {genesis.budget.delta!r}")
        expected = None
        if self._intact:
            try:
                expected = composer.epsilon()
            except _ACCOUNTING_ERRORS as error:
                report(ProblemKind.UNCOMPUTABLE, f"the spend cannot be recomputed: {error}")
                self._intact = False
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
