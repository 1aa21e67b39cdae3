"""The privacy ledger's records: budget, spend, entries, checkpoints, problems, and their encoding.

Each ledger row is hashed and signed as follows, so an auditor can re-implement verification
from this docstring alone:

* ``payload`` is the JSON object ``{"format": "securefed-privacy-ledger", "version": 1}``
  extended with every stored column except ``entry_hash`` and ``signature``, serialised with
  sorted keys, no whitespace and ASCII only. Text and integers appear as themselves, NULL as
  ``null``; a float ``x`` appears as ``{"float": x.hex()}`` (exact, unlike a decimal rendering)
  and bytes as ``{"bytes": hex}``. The ``event`` and ``genesis`` columns hold JSON text written
  by securefed; the payload covers that text verbatim.
* ``entry_hash = SHA-256(payload)``; the ``prev_hash`` column of entry ``n`` is the
  ``entry_hash`` of entry ``n - 1`` (32 zero bytes for the genesis entry), the hash chain of
  Haber and Stornetta (1991) and of Schneier and Kelsey's secure audit logs (1999).
* ``signature = Ed25519(b"securefed/privacy-ledger/v1/entry\\x00" || seq as 8 bytes big-endian
  || entry_hash)`` under the site's identity key. The prefix separates ledger signatures from
  every other signature the same key makes; the sequence number makes a signature over an
  entry also a signed checkpoint (:class:`LedgerHead`) of the whole chain up to it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from ..errors import ConfigError, InvalidSignatureError, LedgerIntegrityError
from ..primitives.identity import KEY_SIZE, SIGNATURE_SIZE, PublicIdentity, validate_name
from .accounting import AccountantKind
from .events import DistributedDiscreteGaussian, PoissonSampledGaussian, PrivacyEvent, event_from_record

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_BUDGET_EPSILON",
    "COLUMNS",
    "GENESIS_PREV_HASH",
    "EntryKind",
    "PrivacyBudget",
    "PrivacySpend",
    "LedgerGenesis",
    "LedgerEntry",
    "LedgerHead",
    "ProblemKind",
    "LedgerProblem",
    "within_budget",
    "entry_digest",
    "signed_message",
    "canonical_json",
    "decode_entry",
    "integrity_error",
    "is_privacy_event",
    "MAX_ROUND_ID_LENGTH",
    "MAX_NOTE_LENGTH",
]

FORMAT_NAME = "securefed-privacy-ledger"
FORMAT_VERSION = 1
# Beyond this an epsilon bounds nothing useful (e^100 likelihood ratio); such a "budget" is a typo.
MAX_BUDGET_EPSILON = 100.0
# A charge may reach the budget up to float rounding of the composition, never more.
_BUDGET_RELATIVE_SLACK = 1e-12
GENESIS_PREV_HASH = bytes(32)
_SIGNATURE_DOMAIN = b"securefed/privacy-ledger/v1/entry\x00"
MAX_ROUND_ID_LENGTH = 200
MAX_NOTE_LENGTH = 4096
_LISTED_PROBLEMS = 20

COLUMNS = (
    "seq", "kind", "round_id", "event", "accountant", "epsilon_after", "delta_after",
    "recorded_at", "note", "settles", "genesis", "prev_hash", "entry_hash", "signature",
)
_HASHED_COLUMNS = COLUMNS[:-2]


class EntryKind(Enum):
    GENESIS = "genesis"  # seq 0: format, site, key, budget, accountant
    CHARGE = "charge"  # a mechanism about to run; written before it touches data
    SETTLE = "settle"  # the mechanism that actually ran, replacing a charge's worst case


def _real(name: str, value: object, problems: list[str]) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        problems.append(f"budget {name} must be a finite number, got {value!r}")
        return False
    return True


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


@dataclass(frozen=True, kw_only=True)
class LedgerGenesis:
    """What entry 0 fixes for the ledger's life; signed, so a budget edit is detectable."""

    format_version: int
    site: str
    verify_key: bytes
    budget: PrivacyBudget
    accountant: AccountantKind

    def to_json(self) -> str:
        return canonical_json({
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "site": self.site,
            "verify_key": self.verify_key.hex(),
            "budget": {"epsilon": self.budget.epsilon, "delta": self.budget.delta},
            "accountant": self.accountant.value,
        })

    @classmethod
    def from_json(cls, text: object) -> LedgerGenesis:
        """Parse the genesis column; a ConfigError lists everything wrong with it."""
        try:
            data = json.loads(text) if isinstance(text, str) else None
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise ConfigError("the genesis record is not a JSON object")
        expected = {"format", "format_version", "site", "verify_key", "budget", "accountant"}
        problems = [f"the genesis record lacks {k!r}" for k in sorted(expected - set(data))]
        problems += [f"the genesis record has unknown field {k!r}" for k in sorted(set(data) - expected)]
        if problems:
            raise ConfigError(problems)
        if data["format"] != FORMAT_NAME:
            problems.append(f"the genesis record names format {data['format']!r}, not {FORMAT_NAME!r}")
        version = data["format_version"]
        if version != FORMAT_VERSION or isinstance(version, bool):
            problems.append(
                f"the genesis record has format version {version!r}; this securefed reads version "
                f"{FORMAT_VERSION} (a newer securefed may read it)"
            )
        validate_name(data["site"], problems)
        key = data["verify_key"]
        try:
            verify_key = bytes.fromhex(key) if isinstance(key, str) else b""
        except ValueError:
            verify_key = b""
        if len(verify_key) != KEY_SIZE:
            problems.append(f"the genesis verify_key is not {KEY_SIZE} bytes of hex")
        budget = _genesis_budget(data["budget"], problems)
        try:
            accountant = AccountantKind(data["accountant"])
        except ValueError:
            problems.append(f"the genesis record names unknown accountant {data['accountant']!r}")
        if problems:
            raise ConfigError(problems)
        return cls(format_version=version, site=data["site"], verify_key=verify_key, budget=budget,
                   accountant=accountant)


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
    return _SIGNATURE_DOMAIN + seq.to_bytes(8, "big") + entry_hash


@dataclass(frozen=True, kw_only=True)
class LedgerHead:
    """A signed checkpoint: the last entry's sequence number, hash and signature.

    A hash chain shows that nothing inside it was changed, but not that nothing was cut off its
    end; a site publishing its head to an auditor after each round closes that gap, since a
    later ledger must still contain this exact entry.
    """

    seq: int
    entry_hash: bytes
    signature: bytes

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 0:
            problems.append(f"head seq must be an int >= 0, got {self.seq!r}")
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


def _hashable(value: object) -> object:
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, bytes | bytearray):
        return {"bytes": bytes(value).hex()}
    # Only a hand-edited database holds anything else; tag it so it cannot collide.
    return {"other": type(value).__name__, "repr": repr(value)}


def entry_digest(row: Mapping[str, object]) -> bytes:
    """SHA-256 of the canonical payload of a row (see the module docstring)."""
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    payload.update({column: _hashable(row[column]) for column in _HASHED_COLUMNS})
    return hashlib.sha256(canonical_json(payload).encode("ascii")).digest()


def _typed(row: Mapping[str, object], column: str, kind: type | tuple[type, ...], problems: list[str],
           *, nullable: bool = False) -> Any:
    value = row[column]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        problems.append(f"{column} has the wrong type ({type(value).__name__})")
        return None
    return value


def decode_entry(row: Mapping[str, object]) -> tuple[LedgerEntry | None, list[str]]:
    """Decode a stored row; return the entry, or None and every reason it cannot be decoded."""
    problems: list[str] = []
    seq = _typed(row, "seq", int, problems)
    kind_text = _typed(row, "kind", str, problems)
    kind = None
    if kind_text is not None:
        try:
            kind = EntryKind(kind_text)
        except ValueError:
            problems.append(f"unknown entry kind {kind_text!r}")
    round_id = _typed(row, "round_id", str, problems)
    accountant = None
    accountant_text = _typed(row, "accountant", str, problems)
    if accountant_text is not None:
        try:
            accountant = AccountantKind(accountant_text)
        except ValueError:
            problems.append(f"unknown accountant {accountant_text!r}")
    epsilon_after = _typed(row, "epsilon_after", float, problems)
    delta_after = _typed(row, "delta_after", float, problems)
    recorded_at = _typed(row, "recorded_at", str, problems)
    if recorded_at is not None and not _is_utc_timestamp(recorded_at):
        problems.append(f"recorded_at {recorded_at!r} is not an ISO-8601 UTC time")
    note = _typed(row, "note", str, problems)
    settles = _typed(row, "settles", int, problems, nullable=True)
    hashes = [_typed(row, c, bytes, problems) for c in ("prev_hash", "entry_hash", "signature")]
    event = _decode_event(row["event"], problems)
    genesis = None
    if row["genesis"] is not None:
        try:
            genesis = LedgerGenesis.from_json(row["genesis"])
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        return None, problems
    prev_hash, entry_hash, signature = hashes
    return LedgerEntry(
        seq=seq, kind=kind, round_id=round_id, event=event, accountant=accountant,
        epsilon_after=epsilon_after, delta_after=delta_after, recorded_at=recorded_at, note=note,
        prev_hash=prev_hash, entry_hash=entry_hash, signature=signature, settles=settles,
        genesis=genesis,
    ), []


def _decode_event(text: object, problems: list[str]) -> PrivacyEvent | None:
    if text is None:
        return None
    try:
        return event_from_record(json.loads(text) if isinstance(text, str) else text)
    except json.JSONDecodeError:
        problems.append("event is not valid JSON")
    except ConfigError as error:
        problems.extend(f"event: {p}" for p in error.problems)
    return None


def _is_utc_timestamp(text: str) -> bool:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return False
    return moment.utcoffset() is not None and moment.utcoffset().total_seconds() == 0


def is_privacy_event(value: object) -> bool:
    return isinstance(value, PoissonSampledGaussian | DistributedDiscreteGaussian)
