"""SEAL objects to and from bytes through a private scratch file.

TenSEAL's ``sealapi`` (the only route to SEAL's seeded ciphertexts) saves and loads only through
file paths, so each owner gets one folder of its own (mode 0700, made by :func:`tempfile.mkdtemp`),
in memory where the system has one (``/dev/shm``), holding a single file rewritten for every
object. Only ciphertexts pass through it, never a key. A lock keeps threads sharing an owner from
interleaving on the file. The folder goes when the owner is closed, collected or the process
exits; it is made again on the next use, and a forked child makes its own and never removes its
parent's. A process killed before its clean-up leaves its folder behind: each folder names its
owner's pid, and the next one made removes those of processes that are gone.

SEAL reads a stream by the size in its header and ignores anything after it, so
:meth:`SealScratch.load` checks that header first (:func:`check_header`): the bytes must be
exactly one SEAL object of at most ``max_bytes``.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from securefed.errors import MalformedMessageError

__all__ = ["SealScratch", "check_header", "SEAL_HEADER_SIZE"]

_MEMORY_FOLDER = Path("/dev/shm")
# SEAL's SEALHeader: magic, header size, version major/minor, compression mode, reserved, total size
_HEADER = struct.Struct("<HBBBBHQ")
SEAL_HEADER_SIZE = _HEADER.size
_MAGIC = 0xA15E
_COMPRESSION_MODES = (0, 1, 2)  # none, zlib, zstd


_PREFIX = "securefed-seal-"


def _sweep(parent: str) -> None:
    """Remove scratch folders that processes killed before their clean-up left behind (each
    folder names its owner's pid; only this user's folders of processes gone are touched)."""
    try:
        entries = os.scandir(parent)
    except OSError:
        return
    with entries:
        for entry in entries:
            pid = entry.name[len(_PREFIX):].split("-", 1)[0]
            if not entry.name.startswith(_PREFIX) or not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:  # alive under another user, or not ours to look at
                continue


def _remove(folder: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked child's exit must not take its parent's folder
        shutil.rmtree(folder, ignore_errors=True)


def check_header(data: bytes, *, max_bytes: int, what: str) -> None:
    """MalformedMessageError unless ``data`` is exactly one SEAL object of at most ``max_bytes``."""
    if len(data) > max_bytes:
        raise MalformedMessageError(f"a {what} of {len(data)} bytes is longer than the {max_bytes} bytes one can "
                                    "take under this CKKS context; the sender used other parameters")
    if len(data) < SEAL_HEADER_SIZE:
        raise MalformedMessageError(f"a {what} of {len(data)} bytes is shorter than SEAL's {SEAL_HEADER_SIZE}-byte "
                                    "header; it was cut off in transit")
    magic, header_size, _, _, compression, _, size = _HEADER.unpack_from(data)
    if magic != _MAGIC or header_size != SEAL_HEADER_SIZE or compression not in _COMPRESSION_MODES:
        raise MalformedMessageError(f"a {what} that does not start with a SEAL header; it is not a SEAL object")
    if size != len(data):
        raise MalformedMessageError(f"a {what} whose SEAL header gives {size} bytes arrived as {len(data)} bytes; "
                                    "it was cut off or has bytes appended")


class SealScratch:
    """One private scratch file for saving and loading SEAL objects as bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folder: str | None = None
        self._pid = 0
        self._finalizer: weakref.finalize | None = None

    @property
    def folder(self) -> str | None:
        """The scratch folder while it exists (None before first use and after :meth:`close`)."""
        return self._folder if self._pid == os.getpid() else None

    def _path(self) -> str:  # with the lock held
        if self._folder is None or self._pid != os.getpid():
            memory = _MEMORY_FOLDER.is_dir() and os.access(_MEMORY_FOLDER, os.W_OK | os.X_OK)
            parent = str(_MEMORY_FOLDER) if memory else tempfile.gettempdir()
            _sweep(parent)
            self._folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent)
            self._pid = os.getpid()
            self._finalizer = weakref.finalize(self, _remove, self._folder, self._pid)
        return os.path.join(self._folder, "object")

    def save(self, seal_object: Any) -> bytes:
        """The bytes SEAL writes for ``seal_object`` (anything with ``save(path)``)."""
        with self._lock:
            path = self._path()
            seal_object.save(path)
            with open(path, "rb") as file:
                return file.read()

    def load(self, seal_object: Any, seal_context: Any, data: bytes, *, max_bytes: int, what: str) -> None:
        """Fill ``seal_object`` (anything with ``load(context, path)``) from ``data``, a ``what``.

        A bad header raises MalformedMessageError; SEAL's own exceptions pass through, for the
        caller to turn into its error.
        """
        check_header(data, max_bytes=max_bytes, what=what)
        with self._lock:
            path = self._path()
            with open(path, "wb") as file:
                file.write(data)
            seal_object.load(seal_context, path)

    def close(self) -> None:
        """Remove the folder now (it is made again if the owner is used after this)."""
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._folder, self._finalizer = None, None

    def __repr__(self) -> str:
        return f"SealScratch(folder={'open' if self.folder else 'none'})"
