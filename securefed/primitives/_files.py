"""Atomic, permission-aware file writes and reads for key and roster files."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from securefed.errors import ConfigError

__all__ = ["write_atomic", "read_private", "read_text", "fsync_path"]

_POSIX = os.name == "posix"


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    if _POSIX:
        fsync_path(directory)


def fsync_path(path: Path) -> None:
    """Best-effort fsync of a file's bytes or of a directory's entries (POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int, overwrite: bool) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix.

    The temporary file is created with ``mode`` from the start (O_CREAT | O_EXCL), so a
    private file is never readable by others, not even briefly. Without ``overwrite`` an
    existing ``path`` is left untouched and :class:`ConfigError` is raised.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise ConfigError(f"cannot write {target}: directory {directory} does not exist")
    if not overwrite and (target.exists() or target.is_symlink()):
        raise ConfigError(f"{target} already exists; pass overwrite=True to replace it")
    temporary = directory / f".{target.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, mode)
    try:
        try:
            if _POSIX:
                # The umask may only remove bits; fchmod pins the exact mode asked for.
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(temporary, target)
        else:
            _publish_without_overwrite(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)
    return target


def _publish_without_overwrite(temporary: Path, target: Path) -> None:
    # A hard link fails if the target appeared meanwhile, closing the check-then-rename race.
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise ConfigError(f"{target} already exists; pass overwrite=True to replace it") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # Filesystems without hard links: fall back to a plain rename after the check above.
        os.replace(temporary, target)
        return
    os.unlink(temporary)


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """Read a UTF-8 text file, turning every failure into a :class:`ConfigError`."""
    target = Path(path)
    try:
        return target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {target} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {what} {target}: {type(error).__name__}") from None


def read_private(path: str | os.PathLike[str], what: str) -> str:
    """Read a secret file, refusing it if group or other users may access it."""
    target = Path(path)
    try:
        info = target.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {target} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot stat {what} {target}: {type(error).__name__}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {target} is not a regular file")
    if _POSIX and info.st_mode & 0o077:
        raise ConfigError(
            f"{what} {target} has permissions {stat.filemode(info.st_mode)}, so other users "
            f"may read it; run `chmod 600 {target}` (and consider the key compromised if "
            "others had access)"
        )
    return read_text(target, what)
