"""The federation roster: every site's public identity, in one agreed order."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from securefed.errors import ConfigError
from securefed.primitives._files import read_text, write_atomic
from securefed.primitives.identity import PublicIdentity

__all__ = ["Roster"]

_ROSTER_FORMAT = "securefed-roster"
_ROSTER_VERSION = 1
_DIGEST_TAG = b"securefed/roster/v1\x00"


class Roster(Mapping[str, PublicIdentity]):
    """An immutable mapping of site name -> :class:`PublicIdentity`, in a fixed order.

    The order is the order given and is part of :meth:`digest`, so parties that loaded the
    same roster file agree on every site's :meth:`index`.
    """

    __slots__ = ("_identities", "_by_name", "_index", "_names", "_digest")

    def __init__(self, identities: Iterable[PublicIdentity]) -> None:
        entries = tuple(identities)
        problems: list[str] = []
        for position, entry in enumerate(entries):
            if not isinstance(entry, PublicIdentity):
                problems.append(
                    f"entry {position} is a {type(entry).__name__}, not a PublicIdentity"
                )
        if problems:
            raise ConfigError(problems)
        if not entries:
            raise ConfigError("a roster needs at least one site")
        problems.extend(_duplicates(entries, "name", lambda e: e.name))
        problems.extend(_duplicates(entries, "verify key", lambda e: e.verify_key))
        problems.extend(_duplicates(entries, "encryption key", lambda e: e.encryption_key))
        if problems:
            raise ConfigError(problems)
        self._identities = entries
        self._by_name = {entry.name: entry for entry in entries}
        self._index = {entry.name: i for i, entry in enumerate(entries)}
        self._names = tuple(entry.name for entry in entries)
        self._digest: bytes | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Site names in roster order."""
        return self._names

    @property
    def identities(self) -> tuple[PublicIdentity, ...]:
        """Public identities in roster order."""
        return self._identities

    def index(self, name: str) -> int:
        """Position of ``name`` in the roster; raises KeyError for an unknown site."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"site {name!r} is not in the roster") from None

    def __getitem__(self, name: str) -> PublicIdentity:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"site {name!r} is not in the roster") from None

    def __len__(self) -> int:
        return len(self._identities)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Roster):
            return self._identities == other._identities
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._identities)

    def __repr__(self) -> str:
        return f"Roster({list(self.names)!r})"

    def digest(self) -> bytes:
        """SHA-256 over a canonical, length-prefixed encoding of the roster in order."""
        if self._digest is None:  # immutable, so computed once (every party checks it each round)
            self._digest = self._compute_digest()
        return self._digest

    def _compute_digest(self) -> bytes:
        hasher = hashlib.sha256(_DIGEST_TAG)
        hasher.update(struct.pack(">I", len(self._identities)))
        for entry in self._identities:
            name = entry.name.encode("utf-8")
            hasher.update(struct.pack(">H", len(name)))
            hasher.update(name)
            hasher.update(entry.verify_key)
            hasher.update(entry.encryption_key)
        return hasher.digest()

    def to_json(self) -> str:
        """Serialise to the roster file format (JSON with a format tag and version)."""
        document = {
            "format": _ROSTER_FORMAT,
            "version": _ROSTER_VERSION,
            "sites": [entry.to_dict() for entry in self._identities],
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Roster:
        """Parse :meth:`to_json` output; raises :class:`ConfigError` listing every problem."""
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            raise ConfigError("roster is not valid JSON") from None
        if not isinstance(document, dict) or document.get("format") != _ROSTER_FORMAT:
            raise ConfigError("this is not a securefed roster (missing or wrong 'format' tag)")
        if document.get("version") != _ROSTER_VERSION:
            raise ConfigError(
                f"roster version {document.get('version')!r} is not supported; "
                f"this securefed reads version {_ROSTER_VERSION}"
            )
        sites = document.get("sites")
        if not isinstance(sites, list):
            raise ConfigError("roster 'sites' must be a list of site entries")
        problems: list[str] = []
        identities: list[PublicIdentity] = []
        for position, entry in enumerate(sites):
            try:
                identities.append(PublicIdentity.from_dict(entry))
            except ConfigError as error:
                problems.extend(f"site entry {position}: {p}" for p in error.problems)
        if problems:
            raise ConfigError(problems)
        return cls(identities)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the roster file atomically (mode 0644: it holds only public keys)."""
        return write_atomic(path, self.to_json().encode("utf-8"), mode=0o644, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Roster:
        """Read a roster file written by :meth:`save`."""
        text = read_text(path, "roster file")
        try:
            return cls.from_json(text)
        except ConfigError as error:
            raise ConfigError([f"roster file {path}: {p}" for p in error.problems]) from None


def _duplicates(
    entries: tuple[PublicIdentity, ...], what: str, key: Callable[[PublicIdentity], object]
) -> list[str]:
    """One problem per value of ``key(entry)`` shared by several entries, naming the sites."""
    seen: dict[object, list[str]] = {}
    for entry in entries:
        seen.setdefault(key(entry), []).append(entry.name)
    problems = []
    for names in seen.values():
        if len(names) < 2:
            continue
        if what == "name":
            problems.append(f"site name {names[0]!r} appears {len(names)} times")
        else:
            problems.append(f"the same {what} is used by sites {names}")
    return problems
