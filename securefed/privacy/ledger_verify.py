"""Verifying a whole privacy ledger file, as an auditor (or the site itself on opening) does."""

from __future__ import annotations

import os

from ..errors import ConfigError, LedgerIntegrityError
from ..primitives.identity import PublicIdentity
from .ledger_chain import ChainVerifier
from .ledger_records import LedgerHead, LedgerProblem, PrivacyBudget, ProblemKind, check_ledger_id
from .ledger_store import LedgerStore

__all__ = ["DEFAULT_BUSY_TIMEOUT_S", "check_expectations", "verify_store", "verify_ledger_file"]

DEFAULT_BUSY_TIMEOUT_S = 30.0


def check_expectations(*, expected_head: object = None, expected_ledger_id: object = None,
                       expected_budget: object = None) -> None:
    """Raise ConfigError naming every expectation argument of the wrong type."""
    problems: list[str] = []
    if expected_head is not None and not isinstance(expected_head, LedgerHead):
        problems.append(f"expected_head must be a LedgerHead, got {type(expected_head).__name__}")
    if expected_ledger_id is not None:
        check_ledger_id(expected_ledger_id, problems, what="expected_ledger_id")
    if expected_budget is not None and not isinstance(expected_budget, PrivacyBudget):
        problems.append(f"expected_budget must be a PrivacyBudget, got {type(expected_budget).__name__}")
    if problems:
        raise ConfigError(problems)


def verify_store(store: LedgerStore, public_key: PublicIdentity, *, expected_head: LedgerHead | None = None,
                 expected_ledger_id: str | None = None,
                 expected_budget: PrivacyBudget | None = None) -> tuple[ChainVerifier, list[LedgerProblem]]:
    """Check every row of ``store`` under ``public_key`` and against the caller's expectations."""
    verifier = ChainVerifier(public_key)
    problems = [LedgerProblem(kind=ProblemKind.CORRUPT_DATABASE, message=f"database check: {p}")
                for p in store.integrity_problems()]
    for row in store.rows():
        problems += verifier.feed(row)
    problems += verifier.finish()
    if expected_head is not None:
        problems += verifier.check_head(expected_head)
    problems += verifier.check_expected(ledger_id=expected_ledger_id, budget=expected_budget)
    return verifier, problems


def verify_ledger_file(path: str | os.PathLike[str], public_key: PublicIdentity, *,
                       expected_head: LedgerHead | None = None, expected_ledger_id: str | None = None,
                       expected_budget: PrivacyBudget | None = None) -> list[LedgerProblem]:
    """Check the ledger at ``path`` under the trusted ``public_key``; return every problem.

    A missing file raises :class:`ConfigError`; a file that is not a ledger at all comes back
    as a single ``NOT_A_LEDGER`` problem. Without ``expected_head`` (the site's last published
    checkpoint) entries cut off the end, or an older copy of the whole file, cannot be detected;
    ``expected_ledger_id`` and ``expected_budget`` catch a file swapped for another ledger of
    the same site.
    """
    if not isinstance(public_key, PublicIdentity):
        raise ConfigError(f"public_key must be a PublicIdentity, got {type(public_key).__name__}")
    check_expectations(expected_head=expected_head, expected_ledger_id=expected_ledger_id,
                       expected_budget=expected_budget)
    try:
        store = LedgerStore.open(path, writable=False, busy_timeout_s=DEFAULT_BUSY_TIMEOUT_S)
    except LedgerIntegrityError as error:
        return [LedgerProblem(kind=ProblemKind.NOT_A_LEDGER, message=str(error))]
    try:
        try:
            _, problems = verify_store(store, public_key, expected_head=expected_head,
                                       expected_ledger_id=expected_ledger_id, expected_budget=expected_budget)
        except LedgerIntegrityError as error:
            return [LedgerProblem(kind=ProblemKind.CORRUPT_DATABASE, message=str(error))]
        return problems
    finally:
        store.close()
