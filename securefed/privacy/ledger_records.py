"""The privacy ledger's records: budget, spend, genesis, entries, checkpoints and problems.

These are the plain values the ledger hands out and the verifier reports; how a row is encoded,
hashed and signed is in :mod:`.ledger_codec`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import ConfigError, InvalidSignatureError, LedgerIntegrityError
from ..primitives.identity import KEY_SIZE, SIGNATURE_SIZE, PublicIdentity, validate_name
from .accounting import AccountantKind
from .events import DistributedDiscreteGaussian, PoissonSampledGaussian, PrivacyEvent

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_BUDGET_EPSILON",
    "GENESIS_PREV_HASH",
    "LEDGER_ID_BYTES",
    "MAX_ROUND_ID_LENGTH",
    "MAX_NOTE_LENGTH",
    "MAX_JSON_LENGTH",
    "EntryKind",
    "PrivacyBudget",
    "PrivacySpend",
    "LedgerGenesis",
    "LedgerEntry",
    "LedgerHead",
    "ProblemKind",
    "LedgerProblem",
    "within_budget",
    "signed_message",
    "canonical_json",
    "load_json",
    "check_ledger_id",
    "integrity_error",
    "is_privacy_event",
]

FORMAT_NAME = "securefed-privacy-ledger"
FORMAT_VERSION = 2
# Beyond this an epsilon bounds nothing useful (e^100 likelihood ratio); such a "budget" is a typo.
MAX_BUDGET_EPSILON = 100.0
# A charge may reach the budget up to float rounding of the composition, never more.
_BUDGET_RELATIVE_SLACK = 1e-12
GENESIS_PREV_HASH = bytes(32)
LEDGER_ID_BYTES = 16
_LEDGER_ID_PATTERN = re.compile(f"[0-9a-f]{{{2 * LEDGER_ID_BYTES}}}")
_SIGNATURE_DOMAIN = b"securefed/privacy-ledger/v2/entry\x00"
MAX_ROUND_ID_LENGTH = 200
MAX_NOTE_LENGTH = 4096
# The event and genesis columns hold a few hundred characters of JSON; anything longer is not ours.
MAX_JSON_LENGTH = 4096
_LISTED_PROBLEMS = 20


class EntryKind(Enum):
    GENESIS = "genesis"  # seq 0: format, ledger id, site, key, budget, accountant
    CHARGE = "charge"  # a mechanism about to run; written before it touches data
    SETTLE = "settle"  # the mechanism that actually ran, replacing a charge's worst case


def _real(name: str, value: object, problems: list[str]) -> bool:
    finite = False
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int beyond float range
            finite = False
    if not finite:
        shown = f"an int of {value.bit_length()} bits" if isinstance(value, int) and not isinstance(value, bool) \
            else f"{value!r}"[:80]
        problems.append(f"budget {name} must be a finite number, got {shown}")
    return finite


@dataclass(frozen=True, kw_only=True)
class PrivacyBudget:
    """The most privacy a site lets the federation spend on its data: (epsilon, delta)."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        problems: list[str] = []
        if _real("epsilon", self.epsilon, problems):
            if not 0.0 < self.epsilon <= MAX_BUDGET_EPSILON:
                problems.append(
                    f"budget epsilon must lie in (0, {MAX_BUDGET_EPSILON:g}], got {self.epsilon!r}; "
                    "common choices for medical data are 1 to 10"
                )
            object.__setattr__(self, "epsilon", float(self.epsilon))
        if _real("delta", self.delta, problems):
            if not 0.0 < self.delta < 1.0:
                problems.append(
                    f"budget delta must lie in (0, 1), got {self.delta!r}; pick it well below "
                    "1 / (records per site), e.g. 1e-5"
                )
            object.__setattr__(self, "delta", float(self.delta))
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True, kw_only=True)
class PrivacySpend:
    """Privacy spent so far: every effective event composed at the budget's delta."""

    epsilon: float
    delta: float


def within_budget(epsilon: float, budget: PrivacyBudget) -> bool:
    """True if a composed ``epsilon`` fits ``budget`` (NaN never fits)."""
    return epsilon <= budget.epsilon * (1.0 + _BUDGET_RELATIVE_SLACK)


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII, no NaN: one text per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def load_json(text: object, what: str) -> Any:
    """Parse untrusted JSON text of at most MAX_JSON_LENGTH characters; ConfigError if it is not.

    Python's parser raises ValueError for integers beyond 4300 digits and RecursionError for
    deep nesting; both, and anything too long to be ours, become a ConfigError.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what} is not text")
    if len(text) > MAX_JSON_LENGTH:
        raise ConfigError(f"{what} is {len(text)} characters long; securefed writes at most {MAX_JSON_LENGTH}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError, OverflowError, MemoryError):  # JSONDecodeError is a ValueError
        raise ConfigError(f"{what} is not valid JSON (or nests or counts beyond what JSON here allows)") from None


def check_ledger_id(value: object, problems: list[str], *, what: str = "ledger_id") -> None:
    if not isinstance(value, str) or not _LEDGER_ID_PATTERN.fullmatch(value):
        problems.append(f"{what} must be {2 * LEDGER_ID_BYTES} lowercase hex characters")


@dataclass(frozen=True, kw_only=True)
class LedgerGenesis:
    """What entry 0 fixes for the ledger's life; signed, so a budget edit is detectable.

    ``ledger_id`` is drawn at random when the ledger is created, so two ledgers of one site
    (even with the same budget, created at the same instant) never share a hash chain.
    """

    format_version: int
    ledger_id: str
    site: str
    verify_key: bytes
    budget: PrivacyBudget
    accountant: AccountantKind

    def to_json(self) -> str:
        return canonical_json({
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "ledger_id": self.ledger_id,
            "site": self.site,
            "verify_key": self.verify_key.hex(),
            "budget": {"epsilon": self.budget.epsilon, "delta": self.budget.delta},
            "accountant": self.accountant.value,
        })

    @classmethod
    def from_json(cls, text: object) -> LedgerGenesis:
        """Parse the genesis column; a ConfigError lists everything wrong with it."""
        data = load_json(text, "the genesis record")
        if not isinstance(data, dict):
            raise ConfigError("the genesis record is not a JSON object")
        expected = {"format", "format_version", "ledger_id", "site", "verify_key", "budget", "accountant"}
        problems = [f"the genesis record lacks {k!r}" for k in sorted(expected - set(data))]
        problems += [f"the genesis record has unknown field {k!r}"[:120] for k in sorted(set(data) - expected)]
        if problems:
            raise ConfigError(problems)
        if data["format"] != FORMAT_NAME:
            problems.append(f"the genesis record names format {data['format']!r}, not {FORMAT_NAME!r}"[:200])
        version = data["format_version"]
        if version != FORMAT_VERSION or isinstance(version, bool):
            problems.append(
                f"the genesis record has format version {str(version)[:20]}; this securefed reads version "
                f"{FORMAT_VERSION} (a newer securefed may read it)"
            )
        check_ledger_id(data["ledger_id"], problems, what="the genesis ledger_id")
        validate_name(data["site"], problems)
        key = data["verify_key"]
        try:
            verify_key = bytes.fromhex(key) if isinstance(key, str) else b""
        except ValueError:
            verify_key = b""
        if len(verify_key) != KEY_SIZE:
            problems.append(f"the genesis verify_key is not {KEY_SIZE} bytes of hex")
        budget = _genesis_budget(data["budget"], problems)
        accountant = None
        if isinstance(data["accountant"], str) and data["accountant"] in {k.value for k in AccountantKind}:
            accountant = AccountantKind(data["accountant"])
        else:
            problems.append(f"the genesis record names an unknown accountant: {data['accountant']!r}"[:200])
        if problems:
            raise ConfigError(problems)
        return cls(format_version=version, ledger_id=data["ledger_id"], site=data["site"],
                   verify_key=verify_key, budget=budget, accountant=accountant)


def _genesis_budget(value: object, problems: list[str]) -> PrivacyBudget | None:
    if not isinstance(value, dict) or set(value) != {"epsilon", "delta"}:
        problems.append("the genesis budget must be an object with exactly 'epsilon' and 'delta'")
        return None
    try:
        return PrivacyBudget(epsilon=value["epsilon"], delta=value["delta"])
    except ConfigError as error:
        problems.extend(f"the genesis {p}" for p in error.problems)
        return None


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One signed ledger row, decoded."""

    seq: int
    kind: EntryKind
    round_id: str
    event: PrivacyEvent | None
    accountant: AccountantKind
    epsilon_after: float
    delta_after: float
    recorded_at: str
    note: str
    prev_hash: bytes
    entry_hash: bytes
    signature: bytes
    settles: int | None = None
    genesis: LedgerGenesis | None = None

    @property
    def spend_after(self) -> PrivacySpend:
        return PrivacySpend(epsilon=self.epsilon_after, delta=self.delta_after)


def signed_message(seq: int, entry_hash: bytes) -> bytes:
    """What the site signs for entry ``seq``: a domain tag, seq (8 bytes big-endian), the hash."""
    return _SIGNATURE_DOMAIN + seq.to_bytes(8, "big") + entry_hash


@dataclass(frozen=True, kw_only=True)
class LedgerHead:
    """A signed checkpoint: the last entry's sequence number, hash and signature.

    A hash chain shows that nothing inside it was changed, but not that nothing was cut off its
    end, nor that the whole file was not swapped for an older copy; a site publishing its head
    after each charge closes that gap, since a later ledger must still contain this exact entry.
    """

    seq: int
    entry_hash: bytes
    signature: bytes

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or not 0 <= self.seq < 2**63:
            problems.append(f"head seq must be an int in [0, 2**63), got {self.seq!r}"[:120])
        for name, size in (("entry_hash", 32), ("signature", SIGNATURE_SIZE)):
            value = getattr(self, name)
            if not isinstance(value, bytes | bytearray) or len(value) != size:
                problems.append(f"head {name} must be {size} bytes")
            else:
                object.__setattr__(self, name, bytes(value))
        if problems:
            raise ConfigError(problems)

    def __repr__(self) -> str:
        return f"LedgerHead(seq={self.seq}, entry_hash={self.entry_hash.hex()[:16]}...)"

    def verify(self, public_key: PublicIdentity) -> None:
        """Raise :class:`LedgerIntegrityError` unless this checkpoint is signed by ``public_key``."""
        try:
            public_key.verify(signed_message(self.seq, self.entry_hash), self.signature)
        except InvalidSignatureError:
            raise LedgerIntegrityError(
                f"the ledger checkpoint at entry {self.seq} is not signed by site {public_key.name!r}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "entry_hash": self.entry_hash.hex(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Any) -> LedgerHead:
        if not isinstance(data, dict) or set(data) != {"seq", "entry_hash", "signature"}:
            raise ConfigError("a ledger head must be an object with exactly seq, entry_hash, signature")
        try:
            entry_hash, signature = bytes.fromhex(data["entry_hash"]), bytes.fromhex(data["signature"])
        except (TypeError, ValueError):
            raise ConfigError("ledger head entry_hash and signature must be hex strings") from None
        return cls(seq=data["seq"], entry_hash=entry_hash, signature=signature)


class ProblemKind(Enum):
    NOT_A_LEDGER = "not-a-ledger"  # not SQLite, another schema, unknown version, unreadable
    CORRUPT_DATABASE = "corrupt-database"  # SQLite's own integrity check failed
    MISSING_GENESIS = "missing-genesis"
    BAD_GENESIS = "bad-genesis"
    WRONG_KEY = "wrong-key"  # genesis names another key than the one the verifier trusts
    SEQUENCE = "sequence"  # gap, duplicate or disorder in seq
    BROKEN_CHAIN = "broken-chain"  # prev_hash is not the previous entry's hash
    HASH_MISMATCH = "hash-mismatch"  # content edited after signing
    BAD_SIGNATURE = "bad-signature"
    MALFORMED_ENTRY = "malformed-entry"
    INCONSISTENT_ENTRY = "inconsistent-entry"  # e.g. accountant differs from genesis
    BAD_SETTLE = "bad-settle"
    SPEND_MISMATCH = "spend-mismatch"  # recorded epsilon/delta differ from the recomputation
    OVER_BUDGET = "over-budget"  # a charge that should have been refused was recorded
    UNCOMPUTABLE = "uncomputable"  # the accountant cannot recompute the spend
    TRUNCATED = "truncated"  # entries after the auditor's checkpoint are gone
    HEAD_MISMATCH = "head-mismatch"  # the checkpointed entry was rewritten
    LEDGER_MISMATCH = "ledger-mismatch"  # another ledger id or budget than the caller expects


@dataclass(frozen=True, kw_only=True)
class LedgerProblem:
    kind: ProblemKind
    message: str
    seq: int | None = None

    def __str__(self) -> str:
        return self.message


def integrity_error(path: object, problems: list[LedgerProblem]) -> LedgerIntegrityError:
    """One error listing the problems (the first few of a long list), with what to do about it."""
    listed = "\n".join(f"  - {p.message}" for p in problems[:_LISTED_PROBLEMS])
    if len(problems) > _LISTED_PROBLEMS:
        listed += f"\n  ... and {len(problems) - _LISTED_PROBLEMS} more (verify() lists them all)"
    return LedgerIntegrityError(
        f"privacy ledger {path} failed verification ({len(problems)} problem"
        f"{'s' if len(problems) != 1 else ''}):\n{listed}\nKeep this file for investigation and "
        "restore the ledger from a backup; do not charge against a ledger that does not verify."
    )


def is_privacy_event(value: object) -> bool:
    return isinstance(value, PoissonSampledGaussian | DistributedDiscreteGaussian)
