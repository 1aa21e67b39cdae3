"""Crash-consistent checkpoints of a run: after every completed round, the state to resume from.

A checkpoint is a directory ``checkpoints/round-NNNN-<random>/`` holding the global model
(``model.npy``) and the run's history (``state.json``), written under a temporary name, flushed
to disk and then renamed; ``checkpoints/LATEST`` (replaced atomically) names the newest complete
one. A directory is never rewritten in place, so a process killed at any moment leaves either the
previous checkpoint or the new one, never a mix. The previous checkpoint is kept until the next
one is complete.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from securefed.errors import ConfigError
from securefed.primitives._files import fsync_path, write_atomic

__all__ = ["RunState", "save_checkpoint", "load_checkpoint", "next_attempt"]

_FORMAT = "securefed-run-checkpoint"


@dataclass
class RunState:
    completed_rounds: int
    model: np.ndarray  # float32, the global model after ``completed_rounds`` rounds
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed round


def _directory(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: str | os.PathLike[str], state: RunState) -> Path:
    """Write ``state`` as the newest checkpoint of ``run_dir`` (atomically) and return its path."""
    base = _directory(Path(run_dir))
    base.mkdir(exist_ok=True)
    name = f"round-{state.completed_rounds:04d}-{secrets.token_hex(4)}"
    temporary = base / f".{name}.tmp"
    temporary.mkdir()
    try:
        with open(temporary / "model.npy", "wb") as out:
            np.save(out, np.ascontiguousarray(state.model, dtype=np.float32), allow_pickle=False)
            out.flush()
            os.fsync(out.fileno())
        text = json.dumps({"format": _FORMAT, "version": 1, "completed_rounds": state.completed_rounds,
                           "history": state.history}, indent=1)
        write_atomic(temporary / "state.json", text.encode(), mode=0o644, overwrite=False)
        final = base / name
        os.replace(temporary, final)
        fsync_path(base)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    previous = _latest_name(base)
    write_atomic(base / "LATEST", name.encode(), mode=0o644, overwrite=True)
    for old in base.iterdir():  # keep the new one and the one before it
        if old.name not in (name, previous, "LATEST"):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return final


def _latest_name(base: Path) -> str | None:
    pointer = base / "LATEST"
    return pointer.read_text().strip() if pointer.exists() else None


def load_checkpoint(run_dir: str | os.PathLike[str]) -> RunState | None:
    """The newest complete checkpoint of ``run_dir``, or None if no round has completed."""
    base = _directory(Path(run_dir))
    name = _latest_name(base) if base.is_dir() else None
    if name is None:
        return None
    where = base / name
    try:
        data = json.loads((where / "state.json").read_text())
        if data.get("format") != _FORMAT:
            raise ValueError("not a securefed checkpoint")
        with open(where / "model.npy", "rb") as source:
            model = np.load(source, allow_pickle=False)
        if model.dtype != np.float32 or model.ndim != 1:
            raise ValueError(f"the model must be a flat float32 array, got {model.dtype} {model.shape}")
        return RunState(int(data["completed_rounds"]), model, list(data["history"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"checkpoint {where} is unreadable ({exc}); the run cannot resume from it") from None


def next_attempt(run_dir: str | os.PathLike[str], *, limit: int) -> int:
    """Count one more start of this run (0 for the first) and persist it before any round begins.

    Protocol round ids are built from (round, attempt), so a round repeated after a crash gets a
    fresh id that every site accepts as newer than anything it started before.
    """
    path = Path(run_dir) / "attempts.json"
    attempt = json.loads(path.read_text())["attempts"] if path.exists() else 0
    if attempt >= limit:
        raise ConfigError(f"this run has been started {attempt} times, the most a run directory supports; "
                          "start a new run")
    write_atomic(path, json.dumps({"attempts": attempt + 1}).encode(), mode=0o644, overwrite=True)
    return attempt
