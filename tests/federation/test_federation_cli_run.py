"""``securefed run`` as users run it: a subprocess, its exit code, its JSON, its run directory.

Includes the crash test: a run killed with SIGKILL in the middle of a round resumes with
``--resume``, completes every round once, charges no site twice for a round, and ends with the
same model as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from securefed.primitives.keys import SiteIdentity
from securefed.privacy.ledger import PrivacyLedger

SMALL = """
[federation]
rounds = {rounds}
sites = 4
aggregation = "secagg"
seed = 3

[data]
kind = "breast-cancer"
split = "dirichlet"
alpha = 5.0

[model]
name = "mlp"

[privacy]
target_epsilon = 3.0
delta = 1e-5
"""


def securefed(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "securefed", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _config(tmp_path: Path, rounds: int = 3, extra: str = "") -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(SMALL.format(rounds=rounds) + extra)
    return path


def _dp_sgd_charges(run_dir: Path, site: str) -> list[str]:
    workspace = run_dir / "sites" / site
    public = SiteIdentity.load(workspace / "identity.key").public()
    head = json.loads((workspace / "ledger-head.json").read_text())
    from securefed.privacy.ledger_records import LedgerHead

    with PrivacyLedger.read(workspace / "ledger.sqlite", public_key=public,
                            expected_head=LedgerHead.from_dict(head["head"]),
                            expected_ledger_id=head["ledger_id"]) as ledger:
        return [e.round_id for e in ledger.entries() if e.event is not None]


def test_run_json_reports_rounds_sites_and_final_metrics(tmp_path):
    done = securefed("run", str(_config(tmp_path)), "--run-dir", str(tmp_path / "run"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["run_dir"] == str(tmp_path / "run")
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all("accuracy" in r["metrics"] for r in summary["rounds"])
    assert set(summary["sites"]) == {"site-1", "site-2", "site-3", "site-4"}
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= 3.0 and site["delta"] == pytest.approx(1e-5)
    assert 0.5 < summary["final_metrics"]["accuracy"] <= 1.0
    assert summary["coordinator"]["plaintext_updates_received"] == 0
    kinds = set(summary["coordinator"]["received_by_kind"])
    assert kinds <= {"ProtocolRelay/KeyAdvertisement", "ProtocolRelay/ShareBundle", "ProtocolRelay/MaskedInput",
                     "ProtocolRelay/ConsistencySignature", "ProtocolRelay/UnmaskShares", "Acknowledgement"}
    run = tmp_path / "run"
    for name in ("summary.json", "metrics.jsonl", "model.pt", "coordinator_transcript.json", "roster.json", "run.json"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    for site in summary["sites"]:
        assert _dp_sgd_charges(run, site) == ["round-1", "round-2", "round-3"]
    # The auditor's command accepts each ledger under the roster's key and the published head.
    published = run / "sites" / "site-1" / "ledger-head.json"  # the site's published head, as written
    audit = securefed("ledger", "verify", str(run / "sites" / "site-1" / "ledger.sqlite"), "--roster",
                      str(run / "roster.json"), "--site", "site-1", "--head", str(published), cwd=tmp_path)
    assert audit.returncode == 0, audit.stderr
    other = json.loads((run / "sites" / "site-2" / "ledger-head.json").read_text())
    swapped = securefed("ledger", "verify", str(run / "sites" / "site-1" / "ledger.sqlite"), "--roster",
                        str(run / "roster.json"), "--site", "site-1", "--ledger-id", other["ledger_id"], cwd=tmp_path)
    assert swapped.returncode != 0  # another site's ledger id: not this ledger


def test_the_table_output_names_every_site_and_its_epsilon(tmp_path):
    done = securefed("run", str(_config(tmp_path, rounds=1)), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for site in ("site-1", "site-2", "site-3", "site-4"):
        assert site in done.stdout
    assert "epsilon" in done.stdout and "accuracy" in done.stdout


@pytest.mark.parametrize("body, expected", [
    ("[federation]\nrounsd = 2\n", "did you mean 'rounds'"),
    ("[data]\nkind = \"medmnist\"\npath = \"missing.npz\"\n", "missing.npz"),
    ("[model]\nname = \"unet\"\n", "unet"),
    ("[federation]\nsites = 2\n[secagg]\nthreshold = 3\n", "threshold"),
    ("[privacy]\nnoise_multiplier = 0.5\nbudget_epsilon = 0.01\n", "cannot cover even one round"),
    ("[federation]\nrounds = \"three\"\n", "rounds"),
    ("[privacy]\ntarget_epsilon = 0.001\n", "target_epsilon cannot be reached"),
])
def test_bad_input_exits_2_with_one_clear_message_before_training(tmp_path, body, expected):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    done = securefed("run", str(path), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "sites").exists(), "a refused config must not start a run"


def test_images_with_nan_are_refused_before_any_budget_is_spent(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 28, 28)).astype(np.float32)
    images[3, 4, 5] = np.nan
    labels = rng.integers(0, 2, (60, 1))
    np.savez(tmp_path / "scans.npz", train_images=images[:40], train_labels=labels[:40], val_images=images[40:50],
             val_labels=labels[40:50], test_images=images[50:], test_labels=labels[50:])
    config = tmp_path / "nan.toml"
    config.write_text('[data]\nkind = "medmnist"\npath = "scans.npz"\n[model]\nname = "mlp"\n[privacy]\ndelta = 1e-3\n')
    done = securefed("run", str(config), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2 and "NaN" in done.stderr, done.stderr
    assert not (tmp_path / "run" / "sites").exists()


def test_a_damaged_run_directory_exits_2_and_debug_shows_the_traceback(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{not json")
    done = securefed("run", "--resume", str(run_dir), cwd=tmp_path)
    assert done.returncode == 2 and "unreadable" in done.stderr and "Traceback" not in done.stderr
    done = securefed("--debug", "run", "--resume", str(run_dir), cwd=tmp_path)
    assert "Traceback" in done.stderr


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the kill point: {process.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("the kill point never came")


def _site_state(run_dir: Path, site: str = "site-1") -> dict:
    try:
        return json.loads((run_dir / "sites" / site / "state.json").read_text())
    except (OSError, ValueError):
        return {"trained": {}, "released": []}


def _started_but_nothing_left(run_dir: Path, round_: int) -> bool:
    states = [_site_state(run_dir, f"site-{i}") for i in range(1, 5)]
    return str(round_) in states[0]["trained"] and all(round_ not in s["released"] for s in states)


def test_sigkill_mid_round_then_resume_finishes_without_double_charges(tmp_path):
    config = _config(tmp_path, rounds=3)
    reference = securefed("run", str(config), "--run-dir", str(tmp_path / "reference"), "--json", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "securefed", "run", str(config), "--run-dir", str(run_dir),
                                "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        # Kill once a site has started round 2 (charged or training) and before any update left.
        _wait_for(lambda: _started_but_nothing_left(run_dir, 2), process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip() if (run_dir / "checkpoints" / "LATEST").exists() else None
    assert latest is None or latest.startswith("round-0001-")  # round 2 never completed

    resumed = securefed("run", "--resume", str(run_dir), "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    for site in summary["sites"]:
        assert _dp_sgd_charges(run_dir, site) == ["round-1", "round-2", "round-3"], site
    expected = json.loads(reference.stdout)
    for site, spent in summary["sites"].items():
        assert spent["epsilon"] == pytest.approx(expected["sites"][site]["epsilon"], rel=1e-12)
    # The replayed round drew the same batches and noise from the same model: the same final model.
    import torch

    final = torch.load(run_dir / "model.pt", weights_only=True)
    clean = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    for key in clean:
        np.testing.assert_allclose(final[key].numpy(), clean[key].numpy(), rtol=0, atol=1e-6)
    assert summary["final_metrics"] == pytest.approx(expected["final_metrics"], abs=1e-6)


def test_sigkill_after_updates_left_resumes_without_replaying_them(tmp_path):
    config = _config(tmp_path, rounds=3)
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "securefed", "run", str(config), "--run-dir", str(run_dir),
                                "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:  # kill once site-1's masked update of round 2 has left it
        _wait_for(lambda: 2 in _site_state(run_dir)["released"], process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    resumed = securefed("run", "--resume", str(run_dir), "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    second = summary["rounds"][1]
    # Either the round's aggregate reached the checkpoint before the kill, or every site that had
    # released its update sat the replay out (the round then failed rather than combine releases).
    assert second["failure"] is None or "site-1" in second["dropped"]
    for site in summary["sites"]:
        assert _dp_sgd_charges(run_dir, site) == ["round-1", "round-2", "round-3"], site
    assert summary["rounds"][2]["failure"] is None


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    first = securefed("run", str(_config(tmp_path, rounds=1)), "--run-dir", str(run_dir), "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = securefed("run", "--resume", str(run_dir), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["rounds"] == json.loads(first.stdout)["rounds"]
    assert _dp_sgd_charges(run_dir, "site-1") == ["round-1"]


def test_a_run_directory_in_use_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "something").write_text("x")
    done = securefed("run", str(_config(tmp_path, rounds=1)), "--run-dir", str(run_dir), cwd=tmp_path)
    assert done.returncode == 2 and "--resume" in done.stderr
