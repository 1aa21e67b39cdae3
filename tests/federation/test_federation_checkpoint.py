"""Checkpoints: atomic, the newest complete one wins, leftovers of a killed write are ignored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from securefed.errors import ConfigError
from securefed.federation.checkpoint import RunState, load_checkpoint, next_attempt, save_checkpoint
from securefed.federation.workspace import SiteState, SiteWorkspace


def test_save_and_load_the_newest(tmp_path):
    assert load_checkpoint(tmp_path) is None
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, RunState(r, np.full(5, r, np.float32), [{"round": i} for i in range(1, r + 1)]))
    state = load_checkpoint(tmp_path)
    assert state.completed_rounds == 3 and state.model.tolist() == [3.0] * 5 and len(state.history) == 3
    kept = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "checkpoints").iterdir() if p.name != "LATEST")
    assert kept == ["round-0002", "round-0003"]
    assert (tmp_path / "checkpoints" / "LATEST").read_text().startswith("round-0003-")


def test_saving_the_same_round_again_never_touches_the_directory_latest_names(tmp_path):
    save_checkpoint(tmp_path, RunState(1, np.ones(3, np.float32), [{"round": 1, "metrics": None}]))
    first = (tmp_path / "checkpoints" / "LATEST").read_text()
    save_checkpoint(tmp_path, RunState(1, np.ones(3, np.float32), [{"round": 1, "metrics": {"accuracy": 1.0}}]))
    second = (tmp_path / "checkpoints" / "LATEST").read_text()
    assert first != second and (tmp_path / "checkpoints" / first).is_dir()  # the previous one is kept
    assert load_checkpoint(tmp_path).history == [{"round": 1, "metrics": {"accuracy": 1.0}}]


def test_a_write_killed_halfway_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, RunState(1, np.ones(4, np.float32), [{"round": 1}]))
    base = tmp_path / "checkpoints"
    # What a kill leaves at each point of the next write: a half-written temporary directory, and
    # a complete directory that LATEST does not name yet.
    (base / ".round-0002.abc.tmp").mkdir()
    (base / ".round-0002.abc.tmp" / "model.npy").write_bytes(b"\x93NUMPY partial")
    (base / "round-0002-0000").mkdir()
    (base / "round-0002-0000" / "state.json").write_text("{")
    assert load_checkpoint(tmp_path).completed_rounds == 1
    save_checkpoint(tmp_path, RunState(2, np.full(4, 2, np.float32), [{"round": 1}, {"round": 2}]))
    assert load_checkpoint(tmp_path).completed_rounds == 2
    assert not (base / ".round-0002.abc.tmp").exists()


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, RunState(1, np.ones(4, np.float32), []))
    latest = (tmp_path / "checkpoints" / "LATEST").read_text()
    (tmp_path / "checkpoints" / latest / "model.npy").write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_attempts_count_up_and_stop_at_the_limit(tmp_path):
    assert [next_attempt(tmp_path, limit=3) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ConfigError, match="started 3 times"):
        next_attempt(tmp_path, limit=3)
    assert json.loads((tmp_path / "attempts.json").read_text()) == {"attempts": 3}


def test_site_state_round_trips_and_a_damaged_one_is_refused(tmp_path):
    workspace = SiteWorkspace(tmp_path / "site")
    workspace.create()
    assert workspace.load_state() == SiteState()
    workspace.save_state(SiteState(3001, {1: "aa", 2: "bb"}))
    assert workspace.load_state() == SiteState(3001, {1: "aa", 2: "bb"})
    assert oct(workspace.state_file.stat().st_mode & 0o777) == "0o600"
    workspace.state_file.write_text('{"format": "other"}')
    with pytest.raises(ConfigError, match="replayed"):
        workspace.load_state()


def test_metrics_survive_a_torn_last_line(tmp_path):
    workspace = SiteWorkspace(tmp_path / "site")
    workspace.create()
    workspace.record_metrics(0, {"accuracy": 0.5})
    with open(workspace.metrics_file, "a") as out:
        out.write('{"round": 1, "metr')  # a kill in the middle of an append
    workspace.record_metrics(1, {"accuracy": 0.75})
    workspace.record_metrics(1, {"accuracy": 0.0})  # recorded once per round
    assert [(r["round"], r["metrics"]["accuracy"]) for r in workspace.metrics()] == [(0, 0.5), (1, 0.75)]


def test_the_site_secret_seed_is_private_and_stable(tmp_path):
    workspace = SiteWorkspace(tmp_path / "site")
    workspace.create()
    seed = workspace.secret_seed(create_from=bytes(range(32)))
    assert workspace.secret_seed() == seed == bytes(range(32))
    assert oct(workspace.seed_file.stat().st_mode & 0o777) == "0o600"
