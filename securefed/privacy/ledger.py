"""A site's tamper-evident, crash-safe privacy ledger, and the budget it enforces.

Every site keeps its own ledger in its workspace: an append-only SQLite table in which each row
records one mechanism execution (round, mechanism parameters, accountant, epsilon and delta
after composition, time), is hash-chained to the row before it and signed with the site's
Ed25519 identity (Schneier and Kelsey's secure audit logs, 1999; Crosby and Wallach's
tamper-evident logging, 2009). Anyone holding the site's public key can then detect an edited,
deleted or reordered entry, a chain re-signed under another key, or an edited budget.

What a hash chain cannot detect is a rollback: the whole file replaced by an older copy, or its
tail cut off, leaves a shorter chain that verifies. Each ledger carries a random ``ledger_id``
in its signed genesis entry, so it cannot be swapped for another ledger of the same site
(``expected_ledger_id``), and :meth:`PrivacyLedger.head` is a signed checkpoint of the whole
chain. **The site runtime must persist its head outside the ledger file (and publish it to the
federation or an auditor) after every charge and settle, and pass it back as
``expected_head`` to** :meth:`PrivacyLedger.open`, :meth:`PrivacyLedger.read` **and**
:func:`verify_ledger_file`; without it, deleting entries lets a site spend its budget again.

What the budget bounds: the ledger composes record-level events (``PrivacyUnit.RECORD``,
DP-SGD at the site) and site-level events (``PrivacyUnit.SITE``, noise on the federation's
aggregate) into one epsilon at the budget's delta. A site-level guarantee implies the same
guarantee for each record of the site, so the composed total upper-bounds the per-patient
(record-level) privacy loss; composing both never under-counts. That per-patient total is
what the budget limits.

Budget enforcement is check-then-commit under SQLite's write lock: :meth:`PrivacyLedger.charge`
composes every effective event plus the new one at the budget's delta and refuses with
:class:`PrivacyBudgetExceeded`, writing nothing, if the result exceeds the budget. Callers
charge *before* running the mechanism, and every execution that touched data stays charged
even if its round later aborted: the ledger may over-count (a process killed between the commit
and the mechanism), never under-count. :meth:`PrivacyLedger.settle` records what actually ran
when that is known only afterwards, within the rules of :mod:`.ledger_settle`: fewer DP-SGD
steps than charged, or distributed discrete Gaussian noise (Kairouz, Liu and Steinke 2021) from
more surviving sites than the worst case charged, up to the cohort fixed at charge time. A
settle can only lower the spend, and the verifier applies the same rules to every signed settle.

Verification recomputes every entry's spend from the events (a regulator can re-check the
arithmetic) using the budget and accountant from the signed genesis entry, but only ever trusts
the public key the caller supplies: a key stored in the file proves nothing.

Backups: committed entries may sit in the ``-wal`` file next to the database until SQLite
checkpoints them, so copy a live ledger with :meth:`PrivacyLedger.backup` (SQLite's backup API),
never by copying the database file alone. Storage details live in :mod:`.ledger_store`, the row
encoding (the exact hashing and signing format) in :mod:`.ledger_codec`, the records in
:mod:`.ledger_records` and the checks in :mod:`.ledger_chain`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from ..errors import ConfigError, LedgerIntegrityError, PrivacyBudgetExceeded
from ..primitives.identity import PublicIdentity, SiteIdentity
from ..primitives.randomness import RandomSource, SystemRandom
from .accounting import AccountantKind, accountant_kind
from .events import PrivacyEvent
from .ledger_chain import ChainVerifier
from .ledger_codec import COLUMNS, entry_digest
from .ledger_records import (
    FORMAT_VERSION,
    GENESIS_PREV_HASH,
    LEDGER_ID_BYTES,
    MAX_NOTE_LENGTH,
    MAX_ROUND_ID_LENGTH,
    EntryKind,
    LedgerEntry,
    LedgerGenesis,
    LedgerHead,
    LedgerProblem,
    PrivacyBudget,
    PrivacySpend,
    ProblemKind,
    canonical_json,
    integrity_error,
    is_privacy_event,
    signed_message,
    within_budget,
)
from .ledger_store import LedgerExistsError, LedgerStore
from .ledger_verify import DEFAULT_BUSY_TIMEOUT_S, check_expectations, verify_ledger_file, verify_store

__all__ = [
    "EntryKind",
    "LedgerEntry",
    "LedgerGenesis",
    "LedgerHead",
    "LedgerProblem",
    "PrivacyBudget",
    "PrivacyLedger",
    "PrivacySpend",
    "ProblemKind",
    "verify_ledger_file",
]

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _timestamp(clock: Clock) -> str:
    moment = clock()
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ConfigError("the ledger clock must return a timezone-aware datetime")
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _check_text(name: str, value: object, limit: int, problems: list[str], *, required: bool) -> None:
    if not isinstance(value, str):
        problems.append(f"{name} must be a str, got {type(value).__name__}")
    elif required and not value.strip():
        problems.append(f"{name} must not be empty")
    elif len(value) > limit:
        problems.append(f"{name} is {len(value)} characters; the limit is {limit}")
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            problems.append(f"{name} holds a lone surrogate ({value[error.start]!r} at position "
                            f"{error.start}), which is not text; pass a valid Unicode string")


def _check_event(event: object, problems: list[str]) -> None:
    if not is_privacy_event(event):
        problems.append(
            "event must be a privacy event (PoissonSampledGaussian or DistributedDiscreteGaussian), "
            f"got {type(event).__name__}"
        )


def _sealed_row(identity: SiteIdentity, **fields: object) -> tuple[object, ...]:
    values = dict(fields)
    values["entry_hash"] = entry_digest(values)
    values["signature"] = identity.sign(signed_message(values["seq"], values["entry_hash"]))
    return tuple(values[column] for column in COLUMNS)


class PrivacyLedger:
    """One site's privacy ledger. Build it with :meth:`create`, :meth:`open` or :meth:`read`.

    An instance belongs to one thread; other threads and processes open their own. Several
    writers may share a file: each charge locks it and re-checks what the others appended.
    """

    def __init__(self, store: LedgerStore, verifier: ChainVerifier, *, identity: SiteIdentity | None,
                 clock: Clock) -> None:
        self._store = store
        self._verifier = verifier
        self._identity = identity
        self._clock = clock
        self._stale = False
        genesis = verifier.genesis
        assert genesis is not None  # open/read only build verified ledgers
        self._genesis: LedgerGenesis = genesis

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, identity: SiteIdentity, budget: PrivacyBudget,
               accountant: str | AccountantKind = "rdp", clock: Clock | None = None,
               busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, rng: RandomSource | None = None) -> PrivacyLedger:
        """Create a new ledger at ``path`` (never overwriting a file) and open it for writing.

        Its ``ledger_id`` comes from ``rng`` (the operating system's by default; pass a seeded
        source only to reproduce a ledger in tests).
        """
        problems: list[str] = []
        if not isinstance(identity, SiteIdentity):
            problems.append(f"identity must be a SiteIdentity, got {type(identity).__name__}")
        if not isinstance(budget, PrivacyBudget):
            problems.append(f"budget must be a PrivacyBudget, got {type(budget).__name__}")
        try:
            kind = accountant_kind(accountant)
        except ConfigError as error:
            problems.extend(error.problems)
        if problems:
            raise ConfigError(problems)
        clock = clock or _utc_now
        public = identity.public()
        ledger_id = (rng or SystemRandom()).random_bytes(LEDGER_ID_BYTES).hex()
        genesis = LedgerGenesis(format_version=FORMAT_VERSION, ledger_id=ledger_id, site=public.name,
                                verify_key=public.verify_key, budget=budget, accountant=kind)
        row = _sealed_row(
            identity, seq=0, kind=EntryKind.GENESIS.value, round_id="", event=None,
            accountant=kind.value, epsilon_after=0.0, delta_after=0.0, recorded_at=_timestamp(clock),
            note="", settles=None, genesis=genesis.to_json(), prev_hash=GENESIS_PREV_HASH,
        )
        LedgerStore.create(path, row)
        return cls.open(path, identity=identity, clock=clock, busy_timeout_s=busy_timeout_s,
                        expected_ledger_id=ledger_id)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, identity: SiteIdentity, clock: Clock | None = None,
             busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, expected_head: LedgerHead | None = None,
             expected_ledger_id: str | None = None) -> PrivacyLedger:
        """Open an existing ledger for writing after verifying all of it under ``identity``'s key.

        Pass the head persisted after the last charge as ``expected_head`` (and the ledger's id
        as ``expected_ledger_id``): only they reveal a ledger rolled back to an older copy.
        """
        if not isinstance(identity, SiteIdentity):
            raise ConfigError(f"identity must be a SiteIdentity, got {type(identity).__name__}")
        return cls._open_verified(path, identity.public(), identity=identity, clock=clock or _utc_now,
                                  busy_timeout_s=busy_timeout_s, expected_head=expected_head,
                                  expected_ledger_id=expected_ledger_id)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], *, identity: SiteIdentity,
                       budget: PrivacyBudget, accountant: str | AccountantKind = "rdp",
                       clock: Clock | None = None, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
                       expected_head: LedgerHead | None = None,
                       expected_ledger_id: str | None = None) -> PrivacyLedger:
        """Open the ledger at ``path``, creating it if absent; its budget must be ``budget``.

        With an expected head or ledger id the ledger existed before, so a missing file is
        refused rather than replaced by a fresh, unspent one.
        """
        kind = accountant_kind(accountant)
        if not isinstance(budget, PrivacyBudget):
            raise ConfigError(f"budget must be a PrivacyBudget, got {type(budget).__name__}")
        check_expectations(expected_head=expected_head, expected_ledger_id=expected_ledger_id)
        if not Path(path).exists():
            if expected_head is not None or expected_ledger_id is not None:
                raise LedgerIntegrityError(
                    f"privacy ledger {path} is missing, but this site's ledger was created earlier "
                    "(a head or ledger id is expected); restore it from a backup: creating a new one "
                    "would reset the site's spend"
                )
            try:
                return cls.create(path, identity=identity, budget=budget, accountant=accountant,
                                  clock=clock, busy_timeout_s=busy_timeout_s)
            except LedgerExistsError:
                pass  # another process created it first; open theirs below
        ledger = cls.open(path, identity=identity, clock=clock, busy_timeout_s=busy_timeout_s,
                          expected_head=expected_head, expected_ledger_id=expected_ledger_id)
        problems: list[str] = []
        if ledger.budget != budget:
            problems.append(
                f"ledger {path} was created with budget epsilon={ledger.budget.epsilon!r}, "
                f"delta={ledger.budget.delta!r}, not epsilon={budget.epsilon!r}, delta={budget.delta!r}; "
                "a budget is fixed when its ledger is created"
            )
        if ledger.accountant is not kind:
            problems.append(
                f"ledger {path} uses the {ledger.accountant.value!r} accountant, not {accountant!r}"
            )
        if problems:
            ledger.close()
            raise ConfigError(problems)
        return ledger

    @classmethod
    def read(cls, path: str | os.PathLike[str], *, public_key: PublicIdentity,
             busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S, expected_head: LedgerHead | None = None,
             expected_ledger_id: str | None = None) -> PrivacyLedger:
        """Open a ledger read-only (an auditor, or a site's monitor) after verifying it."""
        if not isinstance(public_key, PublicIdentity):
            raise ConfigError(f"public_key must be a PublicIdentity, got {type(public_key).__name__}")
        return cls._open_verified(path, public_key, identity=None, clock=_utc_now,
                                  busy_timeout_s=busy_timeout_s, expected_head=expected_head,
                                  expected_ledger_id=expected_ledger_id)

    @classmethod
    def _open_verified(cls, path: str | os.PathLike[str], public_key: PublicIdentity, *,
                       identity: SiteIdentity | None, clock: Clock, busy_timeout_s: float,
                       expected_head: LedgerHead | None, expected_ledger_id: str | None) -> PrivacyLedger:
        check_expectations(expected_head=expected_head, expected_ledger_id=expected_ledger_id)
        store = LedgerStore.open(path, writable=identity is not None, busy_timeout_s=busy_timeout_s)
        try:
            verifier, problems = verify_store(store, public_key, expected_head=expected_head,
                                              expected_ledger_id=expected_ledger_id)
            if problems:
                raise integrity_error(store.path, problems)
        except BaseException:
            store.close()
            raise
        return cls(store, verifier, identity=identity, clock=clock)

    # -- reading -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def budget(self) -> PrivacyBudget:
        return self._genesis.budget

    @property
    def accountant(self) -> AccountantKind:
        return self._genesis.accountant

    @property
    def site(self) -> str:
        return self._genesis.site

    @property
    def ledger_id(self) -> str:
        """The random id fixed in the genesis entry: tells this ledger from any other of the site."""
        return self._genesis.ledger_id

    @property
    def read_only(self) -> bool:
        return self._identity is None

    def entries(self) -> list[LedgerEntry]:
        self._refresh()
        return list(self._verifier.entries)

    def events(self) -> list[PrivacyEvent]:
        """The events the spend composes: each charge's, or its settlement's if settled."""
        self._refresh()
        return self._verifier.effective_events()

    def spent(self) -> PrivacySpend:
        self._refresh()
        return self._verifier.spent()

    def remaining(self) -> float:
        """Epsilon still available at the budget's delta (0 once the budget is used up)."""
        return max(0.0, self.budget.epsilon - self.spent().epsilon)

    def preview(self, event: PrivacyEvent) -> PrivacySpend:
        """The spend if ``event`` were charged now; writes nothing and checks no budget."""
        problems: list[str] = []
        _check_event(event, problems)
        if problems:
            raise ConfigError(problems)
        self._refresh()
        return PrivacySpend(epsilon=self._verifier.epsilon_if(add=event), delta=self.budget.delta)

    def head(self) -> LedgerHead:
        """A signed checkpoint of the ledger as it is now: persist it and hand it to auditors."""
        self._refresh()
        head = self._verifier.head()
        assert head is not None  # a verified ledger has at least its genesis entry
        return head

    def verify(self, *, expected_head: LedgerHead | None = None) -> list[LedgerProblem]:
        """Re-read and re-check the whole file; return every problem (empty if none).

        The file must still be the ledger this instance opened (same ``ledger_id``).
        """
        check_expectations(expected_head=expected_head)
        try:
            _, problems = verify_store(self._store, self._verifier.public_key, expected_head=expected_head,
                                       expected_ledger_id=self.ledger_id)
        except LedgerIntegrityError as error:
            return [LedgerProblem(kind=ProblemKind.CORRUPT_DATABASE, message=str(error))]
        return problems

    def check(self, *, expected_head: LedgerHead | None = None) -> None:
        """Raise :class:`LedgerIntegrityError` listing every problem, if there is any."""
        problems = self.verify(expected_head=expected_head)
        if problems:
            raise integrity_error(self.path, problems)

    def backup(self, path: str | os.PathLike[str]) -> Path:
        """Copy a consistent snapshot of the ledger, -wal contents included, to the new file ``path``."""
        return self._store.backup(path)

    # -- writing -------------------------------------------------------------------------------

    def charge(self, event: PrivacyEvent, *, round_id: str, note: str = "") -> LedgerEntry:
        """Record ``event`` before it runs, or refuse with :class:`PrivacyBudgetExceeded`.

        Call this before the mechanism touches any data, and run the mechanism only if it
        returns. A refusal writes nothing.
        """
        problems: list[str] = []
        _check_event(event, problems)
        _check_text("round_id", round_id, MAX_ROUND_ID_LENGTH, problems, required=True)
        _check_text("note", note, MAX_NOTE_LENGTH, problems, required=False)
        if problems:
            raise ConfigError(problems)
        identity = self._writer()
        with self._writing():
            before = self._verifier.spent().epsilon
            after = self._verifier.epsilon_if(add=event)
            if not within_budget(after, self.budget):
                raise PrivacyBudgetExceeded(
                    f"site {self.site!r} refuses to charge round {round_id!r} for {event}: it would "
                    f"raise epsilon from {before:.6g} to {after:.6g} (at delta={self.budget.delta:g}, "
                    f"{self.accountant.value} accountant), over the budget of epsilon="
                    f"{self.budget.epsilon:g}, of which {max(0.0, self.budget.epsilon - before):.6g} "
                    "remains. Nothing was recorded, so "
                    "do not run the mechanism. To go on, make the round cheaper (more noise, a smaller "
                    "sample rate or fewer steps), or stop training at this site."
                )
            return self._append(identity, kind=EntryKind.CHARGE, round_id=round_id, event=event,
                                epsilon_after=after, note=note, settles=None)

    def settle(self, charge_seq: int, event: PrivacyEvent, *, note: str = "") -> LedgerEntry:
        """Record the mechanism that actually ran for charge ``charge_seq``, if it cost no more.

        Allowed (see :mod:`.ledger_settle`): a Poisson-sampled Gaussian charge settled with fewer
        steps; a distributed discrete Gaussian charge that records its ``cohort`` settled with
        between its charged number of sites and that cohort. Each charge is settled at most once,
        and a settle never raises the spend. Anything else raises :class:`ConfigError` and
        writes nothing; the charge then stands, which over-counts but never under-counts.
        """
        problems: list[str] = []
        _check_event(event, problems)
        _check_text("note", note, MAX_NOTE_LENGTH, problems, required=False)
        if problems:
            raise ConfigError(problems)
        identity = self._writer()
        with self._writing():
            refusal = self._verifier.settle_refusal(charge_seq, event)
            if refusal is not None:
                raise ConfigError(f"cannot settle in ledger {self.path}: {refusal}")
            charge = self._verifier.charge_entry(charge_seq)
            after = self._verifier.epsilon_if(settle=(charge_seq, event))
            return self._append(identity, kind=EntryKind.SETTLE, round_id=charge.round_id, event=event,
                                epsilon_after=after, note=note, settles=charge_seq)

    def _append(self, identity: SiteIdentity, *, kind: EntryKind, round_id: str, event: PrivacyEvent,
                epsilon_after: float, note: str, settles: int | None) -> LedgerEntry:
        seq = self._verifier.head().seq + 1
        row = _sealed_row(
            identity, seq=seq, kind=kind.value, round_id=round_id,
            event=canonical_json(event.to_record()), accountant=self.accountant.value,
            epsilon_after=float(epsilon_after), delta_after=self.budget.delta,
            recorded_at=_timestamp(self._clock), note=note, settles=settles,
            genesis=None, prev_hash=self._verifier.last_hash(),
        )
        # Until the commit succeeds our view may hold a row the file does not: re-read if it fails.
        self._stale = True
        self._store.insert(row)
        problems = self._verifier.feed(row)
        if problems:  # our own row must verify; anything else is a bug, so write nothing
            raise integrity_error(self.path, problems)
        return self._verifier.entries[-1]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the write lock with an up-to-date view of the chain."""
        with self._store.write_transaction():
            self._refresh()
            yield
        self._stale = False

    def _writer(self) -> SiteIdentity:
        if self._identity is None:
            raise ConfigError(
                f"privacy ledger {self.path} was opened read-only (PrivacyLedger.read); open it with "
                "PrivacyLedger.open(path, identity=...) to charge or settle"
            )
        return self._identity

    def _refresh(self) -> None:
        """Take in, and check, the rows other writers appended since we last looked."""
        if self._stale:
            verifier, problems = verify_store(self._store, self._verifier.public_key,
                                              expected_ledger_id=self.ledger_id)
            if problems:
                raise integrity_error(self.path, problems)
            self._verifier, self._stale = verifier, False
            return
        head = self._verifier.head()
        rows = self._store.rows(from_seq=head.seq)
        first = dict(zip(COLUMNS, rows[0])) if rows else {}
        if first.get("seq") != head.seq or first.get("entry_hash") != head.entry_hash:
            raise integrity_error(self.path, [LedgerProblem(
                kind=ProblemKind.TRUNCATED, seq=head.seq,
                message=f"entry {head.seq}, read earlier, has since been removed or rewritten",
            )])
        problems: list[LedgerProblem] = []
        for row in rows[1:]:
            problems += self._verifier.feed(row)
        if problems:
            raise integrity_error(self.path, problems)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._store.closed else f"{self._verifier.row_count} entries"
        mode = "read-only" if self.read_only else "writer"
        return f"PrivacyLedger({str(self.path)!r}, site={self.site!r}, {mode}, {state})"
