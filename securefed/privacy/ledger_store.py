"""SQLite storage of the privacy ledger: one table of signed rows, written crash-safely.

Why SQLite: a site's ledger must survive the process being killed at any instant and must let an
auditor read while the site writes. SQLite in write-ahead-log mode gives exactly that: every
entry is one transaction, ``synchronous=FULL`` makes a commit durable before it returns, a
reader sees a consistent snapshot (a prefix of the chain) while a writer appends, and a crash
mid-transaction leaves the last committed state (the WAL's uncommitted frames are ignored on
recovery). ``BEGIN IMMEDIATE`` takes the write lock before the budget is read, so two writers
cannot both pass the check on the same spend.

After each committed entry the writer runs a passive checkpoint (it never waits for readers),
so the main database file normally holds every committed entry on its own. Normally is not
always: until a checkpoint completes, committed entries live only in the ``-wal`` file, and a
backup made by copying the database file alone silently loses them. Back a ledger up with
:meth:`LedgerStore.backup` (SQLite's online backup API, a consistent snapshot even while a
writer appends), or copy the database, ``-wal`` and ``-shm`` files together while no writer runs.

Creation is atomic: the database is built complete (schema and signed genesis entry) under a
temporary name and hard-linked into place, so a ledger path never shows a half-made ledger and
two processes creating the same ledger cannot both succeed. Where the filesystem has no hard
links, the name is claimed with an exclusive create and the finished file renamed over the
claim: still never two winners, though a reader may glimpse the empty claim for an instant.

The file identifies itself by SQLite's ``application_id`` header field, carries the format
version in ``user_version`` and must hold exactly the ``entries`` table, with the exact
``CREATE TABLE`` text securefed wrote; anything else at the path (random bytes, another
application's database, a newer format, an altered schema, a truncated file) is refused with a
:class:`LedgerIntegrityError` that says which of these it is. Text is read from SQLite as raw
bytes and decoded by the caller, so a corrupted cell cannot fail a whole read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import ConfigError, LedgerIntegrityError, MissingDependencyError, PrivacyError
from ..primitives._files import fsync_path
from .ledger_codec import COLUMNS
from .ledger_records import FORMAT_VERSION

__all__ = ["APPLICATION_ID", "LedgerExistsError", "LedgerStore"]

APPLICATION_ID = 0x53465044  # "SFPD": securefed privacy DB
_SQLITE_MAGIC = b"SQLite format 3\x00"
_TABLE = "entries"
_CREATE_TABLE = f"""CREATE TABLE {_TABLE} (
    seq INTEGER PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    round_id TEXT NOT NULL,
    event TEXT,
    accountant TEXT NOT NULL,
    epsilon_after REAL NOT NULL,
    delta_after REAL NOT NULL,
    recorded_at TEXT NOT NULL,
    note TEXT NOT NULL,
    settles INTEGER,
    genesis TEXT,
    prev_hash BLOB NOT NULL,
    entry_hash BLOB NOT NULL,
    signature BLOB NOT NULL
) STRICT"""
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM {_TABLE} WHERE seq >= ? ORDER BY seq"
_INSERT = f"INSERT INTO {_TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_FIX = "pass the path of a securefed privacy ledger, or restore this one from a backup"


class LedgerExistsError(ConfigError):
    """``create`` found a file at the ledger path already."""


def _require_sqlite_features() -> None:
    if sqlite3.sqlite_version_info < (3, 37, 0):
        raise MissingDependencyError(
            f"the privacy ledger needs SQLite 3.37 or newer (STRICT tables); this Python links "
            f"SQLite {sqlite3.sqlite_version}. Use a Python build with a newer SQLite."
        )


def _uri(path: Path, mode: str) -> str:
    return f"{path.absolute().as_uri()}?mode={mode}"


def _check_looks_like_sqlite(path: Path) -> None:
    try:
        if not path.exists():
            raise ConfigError(
                f"privacy ledger {path} does not exist; create it with PrivacyLedger.create "
                "(or open_or_create), or check the path"
            )
        if not path.is_file():
            raise ConfigError(f"privacy ledger path {path} is not a regular file")
        with path.open("rb") as handle:
            start = handle.read(len(_SQLITE_MAGIC))
    except OSError as error:
        raise ConfigError(f"cannot read privacy ledger {path}: {type(error).__name__}") from None
    if not start:
        raise LedgerIntegrityError(
            f"{path} is an empty file, not a privacy ledger (securefed never leaves a half-created "
            f"ledger, so something else made it); {_FIX}"
        )
    if start != _SQLITE_MAGIC:
        raise LedgerIntegrityError(
            f"{path} is not a SQLite database, so it is not a securefed privacy ledger (or it is "
            f"badly corrupted); {_FIX}"
        )


class LedgerStore:
    """An open connection to a ledger database, checked to be one."""

    def __init__(self, path: Path, connection: sqlite3.Connection, *, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self._connection: sqlite3.Connection | None = connection

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool, busy_timeout_s: float) -> LedgerStore:
        """Connect to an existing ledger; raise if the file is missing or not a ledger."""
        _require_sqlite_features()
        target = Path(path)
        _check_looks_like_sqlite(target)
        try:
            connection = sqlite3.connect(
                _uri(target, "rw" if writable else "ro"), uri=True, isolation_level=None,
                timeout=busy_timeout_s,
            )
        except sqlite3.Error as error:
            raise ConfigError(f"cannot open privacy ledger {target}: {error}") from None
        # Text comes back as bytes: a cell that is not UTF-8 is the entry's problem, not the read's.
        connection.text_factory = bytes
        store = cls(target, connection, writable=writable)
        try:
            store._check_identity()
            # Defence against a crafted file: never run functions named in its schema.
            connection.execute("PRAGMA trusted_schema = OFF")
            if writable:
                connection.execute("PRAGMA journal_mode = WAL")
                connection.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as error:
            store.close()
            raise _translate(error, target, "read") from None
        except UnicodeError:
            store.close()
            raise LedgerIntegrityError(
                f"{target} has a schema holding text that is not UTF-8: it is corrupt or was altered "
                f"outside securefed; {_FIX}") from None
        except BaseException:
            store.close()
            raise
        return store

    def _check_identity(self) -> None:
        connection = self._require()
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        # At most a few objects: a crafted schema of millions is not read whole.
        objects = connection.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name LIMIT 5").fetchall()
        if application_id != APPLICATION_ID:
            tables = sorted(_shown(name) for kind, name, _, _ in objects if kind == b"table")
            raise LedgerIntegrityError(
                f"{self.path} is a SQLite database but not a securefed privacy ledger "
                f"(application id {application_id:#x}, tables {tables}); {_FIX}"
            )
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version != FORMAT_VERSION:
            newer = " (written by a newer securefed: upgrade to read it)" if version > FORMAT_VERSION else ""
            raise LedgerIntegrityError(
                f"{self.path} is a privacy ledger of format version {version}; this securefed "
                f"reads version {FORMAT_VERSION}{newer}"
            )
        expected = [(b"table", _TABLE.encode(), _TABLE.encode(), _CREATE_TABLE.encode())]
        if objects != expected:
            names = [f"{_shown(kind)} {_shown(name)}" for kind, name, _, _ in objects]
            detail = "a modified 'entries' table" if len(objects) == 1 and objects[0][:3] == expected[0][:3] \
                else f"objects {names}"
            raise LedgerIntegrityError(
                f"{self.path} has a modified schema ({detail}; expected only the '{_TABLE}' table "
                f"as securefed creates it): it was altered outside securefed; {_FIX}"
            )

    @classmethod
    def create(cls, path: str | os.PathLike[str], genesis_row: Sequence[object]) -> None:
        """Write a new ledger holding only ``genesis_row``; refuse if ``path`` exists."""
        _require_sqlite_features()

        def build(connection: sqlite3.Connection) -> None:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            connection.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(_CREATE_TABLE)
            connection.execute(_INSERT, tuple(genesis_row))
            connection.execute("COMMIT")

        _build_and_publish(Path(path), build, "create privacy ledger")

    def backup(self, path: str | os.PathLike[str]) -> Path:
        """Write a consistent snapshot of the ledger to the new file ``path`` (never overwritten)."""
        source = self._require()

        def build(connection: sqlite3.Connection) -> None:
            try:
                source.backup(connection)
            except sqlite3.DatabaseError as error:
                raise _translate(error, self.path, "back up") from None

        target = Path(path)
        _build_and_publish(target, build, "back up the privacy ledger to")
        return target

    def rows(self, *, from_seq: int = 0) -> list[tuple[object, ...]]:
        """Rows with ``seq >= from_seq`` in order, as one consistent snapshot; text cells as bytes."""
        try:
            return self._require().execute(_SELECT, (from_seq,)).fetchall()
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path, "read the entries of") from None
        except UnicodeError:
            raise LedgerIntegrityError(f"cannot read the entries of {self.path}: undecodable text; {_FIX}") from None

    def integrity_problems(self) -> list[str]:
        """SQLite's own structural check of the file (pages, indexes, types)."""
        try:
            found = [_shown(row[0]) for row in self._require().execute("PRAGMA quick_check(20)")]
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.ProgrammingError) or (
                    isinstance(error, sqlite3.OperationalError) and not _is_decode_error(error)):
                raise _translate(error, self.path, "check") from None
            return [f"the database structure cannot be checked: {error}"]
        return [] if found == ["ok"] else found

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[None]:
        """Hold the ledger's write lock: nobody else appends until this commits or rolls back."""
        connection = self._require()
        if not self.writable:
            raise ConfigError(
                f"privacy ledger {self.path} was opened read-only (PrivacyLedger.read); open it with "
                "PrivacyLedger.open(path, identity=...) to charge"
            )
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise PrivacyError(
                f"cannot lock privacy ledger {self.path} for writing ({error}); nothing was "
                "recorded, so do not run the mechanism. Another process may hold it: retry later."
            ) from None
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        try:
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise PrivacyError(
                f"could not commit to privacy ledger {self.path} ({error}); treat the charge as not "
                "made and do not run the mechanism"
            ) from None
        # Copy the committed entry into the main file now if no reader is in the way, so that the
        # database file alone (say, a careless backup) holds it. PASSIVE never waits.
        with contextlib.suppress(sqlite3.Error):
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def insert(self, row: Sequence[object]) -> None:
        try:
            self._require().execute(_INSERT, tuple(row))
        except sqlite3.Error as error:
            raise PrivacyError(
                f"could not write to privacy ledger {self.path} ({error}); nothing was recorded, so "
                "do not run the mechanism"
            ) from None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @property
    def closed(self) -> bool:
        return self._connection is None

    def _require(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ConfigError(f"privacy ledger {self.path} is closed")
        return self._connection


def _shown(value: object) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_decode_error(error: sqlite3.Error) -> bool:
    return "could not decode" in str(error).lower()


def _translate(error: sqlite3.DatabaseError, path: Path, action: str) -> Exception:
    """Tell corruption (the file's fault) from access trouble (the environment's) and misuse."""
    if isinstance(error, sqlite3.ProgrammingError):
        return error  # e.g. an instance used from another thread: a bug in the caller
    if isinstance(error, sqlite3.OperationalError) and not _is_decode_error(error):
        return PrivacyError(
            f"cannot {action} privacy ledger {path} ({error}): check that the file and its directory "
            "are accessible (SQLite readers need to create the -shm file next to it)"
        )
    return LedgerIntegrityError(
        f"cannot {action} privacy ledger {path} ({error}): the database is truncated or corrupt; {_FIX}"
    )


def _build_and_publish(target: Path, build: Callable[[sqlite3.Connection], None], action: str) -> None:
    """Build a database under a temporary name next to ``target``, then move it into place."""
    if not target.parent.is_dir():
        raise ConfigError(f"cannot {action} {target}: directory {target.parent} does not exist")
    if target.exists() or target.is_symlink():
        raise LedgerExistsError(
            f"{target} already exists; open it with PrivacyLedger.open, or choose another path "
            "(a ledger file is never overwritten)"
        )
    temporary = target.parent / f".{target.name}.{secrets.token_hex(8)}.creating"
    try:
        # O_EXCL: the temporary name is ours alone; an empty file is a valid empty database.
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        connection = sqlite3.connect(temporary, isolation_level=None)
        try:
            build(connection)
        finally:
            # Closing the last connection checkpoints the WAL into the file and deletes it.
            connection.close()
        fsync_path(temporary)
        _publish(temporary, target)
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(f"{temporary}{suffix}")
    fsync_path(target.parent)


def _publish(temporary: Path, target: Path) -> None:
    # link() fails if the target appeared meanwhile, so a concurrent creator cannot be overwritten.
    try:
        os.link(temporary, target)
        return
    except FileExistsError:
        raise LedgerExistsError(
            f"{target} already exists (created concurrently); open it with PrivacyLedger.open"
        ) from None
    except OSError:
        pass  # no hard links on this filesystem
    # Claim the name exclusively, then rename the finished file over our own claim.
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        raise LedgerExistsError(
            f"{target} already exists (created concurrently); open it with PrivacyLedger.open"
        ) from None
    try:
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)  # our empty claim, never someone's ledger
        raise
