"""The securefed command, run as a subprocess the way users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def securefed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "securefed", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_shows_the_coordinator_view_and_an_exact_sum() -> None:
    proc = securefed("demo", "--sites", "6", "--length", "200", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["survivors"] == [0, 2, 3, 4, 5]  # site 1 vanished before sending its input
    assert summary["max_abs_error"] <= summary["error_bound"]
    assert set(summary["bytes_per_stage"]) == {
        "advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask"
    }
    # Recompute the plain sum the demo used, independently of securefed.
    updates = np.random.default_rng(0).normal(0.0, 0.05, size=(6, 200))
    plain = updates[[0, 2, 3, 4, 5]].sum(axis=0)
    assert np.allclose(summary["recovered_sum_head"], np.round(plain[:5], 6), atol=2e-6)


def test_demo_table_output() -> None:
    proc = securefed("demo", "--sites", "6", "--length", "50", "--neighbors", "4")
    assert proc.returncode == 0, proc.stderr
    assert "What the coordinator received" in proc.stdout
    assert "4-regular graph" in proc.stdout


def test_bad_input_exits_2_with_one_line() -> None:
    proc = securefed("demo", "--sites", "1")
    assert proc.returncode == 2
    assert "at least 2 sites" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_round_below_threshold_exits_1_naming_the_stage() -> None:
    proc = securefed("demo", "--sites", "4", "--length", "10", "--drop", "masked_input:0,1,2")
    assert proc.returncode == 1
    assert "masked_input" in proc.stderr and "threshold" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_drop_option_exits_2() -> None:
    proc = securefed("demo", "--drop", "nonsense")
    assert proc.returncode == 2
    assert "STAGE:SITE" in proc.stderr


def test_attacks_list_and_play() -> None:
    listed = securefed("attacks", "--list")
    assert listed.returncode == 0
    assert "request-both-shares" in listed.stdout
    played = securefed("attacks", "request-both-shares", "--sites", "6")
    assert played.returncode == 0, played.stderr
    outcome = json.loads(played.stdout)
    assert outcome["refused"] is True and outcome["leaked"] is False
