"""How a privacy ledger row is stored, hashed, signed and decoded.

Each ledger row is hashed and signed as follows, so an auditor can re-implement verification
from this docstring alone:

* ``payload`` is the JSON object ``{"format": "securefed-privacy-ledger", "version": 2}``
  extended with every stored column except ``entry_hash`` and ``signature`` (``seq``, ``kind``,
  ``round_id``, ``event``, ``accountant``, ``epsilon_after``, ``delta_after``, ``recorded_at``,
  ``note``, ``settles``, ``genesis``, ``prev_hash``), serialised with sorted keys, no
  whitespace and ASCII only (Python's ``json.dumps(payload, sort_keys=True,
  separators=(",", ":"), ensure_ascii=True)``). Text and integers appear as themselves, NULL
  as ``null``; a float ``x`` appears as ``{"float": x.hex()}`` (exact, unlike a decimal
  rendering) and bytes as ``{"bytes": hex}``. The ``event`` and ``genesis`` columns hold JSON
  text written by securefed (canonical: sorted keys, no whitespace); the payload covers that
  text verbatim.
* ``entry_hash = SHA-256(payload)``; the ``prev_hash`` column of entry ``n`` is the
  ``entry_hash`` of entry ``n - 1`` (32 zero bytes for the genesis entry), the hash chain of
  Haber and Stornetta (1991) and of Schneier and Kelsey's secure audit logs (1999).
* ``signature = Ed25519(b"securefed/privacy-ledger/v2/entry\\x00" || seq as 8 bytes big-endian
  || entry_hash)`` under the site's identity key. The prefix separates ledger signatures from
  every other signature the same key makes; the sequence number makes a signature over an
  entry also a signed checkpoint (:class:`LedgerHead`) of the whole chain up to it.

Text columns are read from SQLite as bytes and decoded here (strict UTF-8), so a corrupted cell
is reported as a problem of its entry rather than failing the whole read. Only a row whose
hash and signature hold is ever decoded further: everything else in the file is untrusted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ..errors import ConfigError
from .accounting import AccountantKind
from .events import PrivacyEvent, event_from_record
from .ledger_records import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_NOTE_LENGTH,
    MAX_ROUND_ID_LENGTH,
    EntryKind,
    LedgerEntry,
    LedgerGenesis,
    canonical_json,
    load_json,
)

__all__ = ["COLUMNS", "TEXT_COLUMNS", "entry_digest", "decode_text_cells", "decode_entry"]

COLUMNS = (
    "seq", "kind", "round_id", "event", "accountant", "epsilon_after", "delta_after",
    "recorded_at", "note", "settles", "genesis", "prev_hash", "entry_hash", "signature",
)
TEXT_COLUMNS = ("kind", "round_id", "event", "accountant", "recorded_at", "note", "genesis")
_HASHED_COLUMNS = COLUMNS[:-2]
# Longest text securefed writes per column; JSON columns are capped when parsed (load_json).
_TEXT_LIMITS = {"round_id": MAX_ROUND_ID_LENGTH, "note": MAX_NOTE_LENGTH, "recorded_at": 64}
_DECODE_ERRORS = (ConfigError, ValueError, TypeError, RecursionError, OverflowError, MemoryError, UnicodeError)


def _hashable(value: object) -> object:
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, bytes | bytearray):
        return {"bytes": bytes(value).hex()}
    # Only a hand-edited database holds anything else; tag it so it cannot collide.
    return {"other": type(value).__name__}


def entry_digest(row: Mapping[str, object]) -> bytes:
    """SHA-256 of the canonical payload of a row (see the module docstring)."""
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    payload.update({column: _hashable(row[column]) for column in _HASHED_COLUMNS})
    return hashlib.sha256(canonical_json(payload).encode("ascii")).digest()


def decode_text_cells(raw: Sequence[object]) -> tuple[dict[str, object], list[str]]:
    """Map a stored row (text read as bytes) to column values; list the cells that are not text.

    A text cell that is not valid UTF-8 cannot be what the site signed (securefed writes only
    valid text): it is left as None and named in the returned list.
    """
    values = dict(zip(COLUMNS, raw, strict=True))
    unreadable: list[str] = []
    for column in TEXT_COLUMNS:
        value = values[column]
        if isinstance(value, bytes | bytearray):
            try:
                values[column] = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                unreadable.append(f"{column} is not valid UTF-8 text")
                values[column] = None
    return values, unreadable


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
    """Decode a row's values; return the entry, or None and every reason it cannot be decoded.

    Never raises for any content: whatever Python's parsers reject becomes a reason.
    """
    try:
        return _decode_entry(row)
    except _DECODE_ERRORS as error:
        return None, [f"the entry cannot be decoded ({type(error).__name__})"]


def _decode_entry(row: Mapping[str, object]) -> tuple[LedgerEntry | None, list[str]]:
    problems: list[str] = []
    seq = _typed(row, "seq", int, problems)
    kind = _enum(EntryKind, _typed(row, "kind", str, problems), "entry kind", problems)
    round_id = _typed(row, "round_id", str, problems)
    accountant = _enum(AccountantKind, _typed(row, "accountant", str, problems), "accountant", problems)
    epsilon_after = _typed(row, "epsilon_after", float, problems)
    delta_after = _typed(row, "delta_after", float, problems)
    recorded_at = _typed(row, "recorded_at", str, problems)
    if recorded_at is not None and not _is_utc_timestamp(recorded_at):
        problems.append(f"recorded_at {recorded_at[:40]!r} is not an ISO-8601 UTC time")
    note = _typed(row, "note", str, problems)
    settles = _typed(row, "settles", int, problems, nullable=True)
    hashes = [_typed(row, c, bytes, problems) for c in ("prev_hash", "entry_hash", "signature")]
    for column, limit in _TEXT_LIMITS.items():
        if isinstance(row[column], str) and len(row[column]) > limit:
            problems.append(f"{column} is {len(row[column])} characters long; securefed writes at most {limit}")
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


def _enum(cls: type, text: str | None, what: str, problems: list[str]) -> Any:
    if text is None:
        return None
    for member in cls:
        if member.value == text:
            return member
    problems.append(f"unknown {what} {text[:40]!r}")
    return None


def _decode_event(text: object, problems: list[str]) -> PrivacyEvent | None:
    if text is None:
        return None
    try:
        return event_from_record(load_json(text, "the event"))
    except ConfigError as error:
        problems.extend(f"event: {p}" for p in error.problems)
    return None


def _is_utc_timestamp(text: str) -> bool:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return False
    offset = moment.utcoffset()
    return offset is not None and offset.total_seconds() == 0
