"""Scratch folders of killed processes are swept; live processes' folders are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import securefed.he.tenseal_scratch as scratch
from securefed.he.tenseal_scratch import SealScratch


class _Saves:
    def save(self, path: str) -> None:
        with open(path, "wb") as out:
            out.write(b"ciphertext")


def test_folders_of_killed_processes_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(scratch, "_MEMORY_FOLDER", tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = tmp_path / f"securefed-seal-{int(gone.stdout)}-abc"
    live = tmp_path / f"securefed-seal-{os.getppid()}-def"
    unrelated = tmp_path / "securefed-seal-notapid"
    for folder in (dead, live, unrelated):
        folder.mkdir()
        (folder / "object").write_bytes(b"left behind")
    owner = SealScratch()
    assert owner.save(_Saves()) == b"ciphertext"
    assert not dead.exists() and live.exists() and unrelated.exists()
    assert owner.folder is not None and os.path.basename(owner.folder).startswith(f"securefed-seal-{os.getpid()}-")
    owner.close()
    assert not any(p.name.startswith(f"securefed-seal-{os.getpid()}-") for p in tmp_path.iterdir())
