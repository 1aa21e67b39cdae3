"""Crash safety and concurrency of the privacy ledger, with real processes.

A writer process is SIGKILLed at random moments while it charges; after every kill the ledger
must verify cleanly and hold at least as many entries as before. A reader reading while a
writer writes must always see a valid prefix, and two writers racing for the last of a budget
must not overspend it together.
"""

from __future__ import annotations

import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from securefed.primitives.identity import SiteIdentity
from securefed.privacy.accounting import compose_epsilon
from securefed.privacy.events import PoissonSampledGaussian
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger, verify_ledger_file

pytestmark = pytest.mark.slow  # each test starts Python processes (about a second apiece)

DELTA = 1e-5
SITE = SiteIdentity("crash-site", bytes(range(32)), bytes(range(32, 64)))

_PRELUDE = r"""
import sys, time
from securefed.errors import PrivacyBudgetExceeded
from securefed.primitives.identity import SiteIdentity
from securefed.privacy.events import PoissonSampledGaussian
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger
identity = SiteIdentity("crash-site", bytes(range(32)), bytes(range(32, 64)))
path, tag = sys.argv[1], sys.argv[2]
"""

# Charges a cheap event forever (or ``limit`` times), pausing ``pause`` seconds between charges.
WRITER = _PRELUDE + r"""
pause, limit = float(sys.argv[3]), int(sys.argv[4])
ledger = PrivacyLedger.open_or_create(path, identity=identity, budget=PrivacyBudget(epsilon=100.0, delta=1e-5))
event = PoissonSampledGaussian(noise_multiplier=50.0, sample_rate=1.0, steps=1)
print("ready", flush=True)
count = 0
while limit == 0 or count < limit:
    ledger.charge(event, round_id=f"{tag}-{count}")
    count += 1
    time.sleep(pause)
"""

# Waits for "go" on stdin, then charges until the budget refuses; prints how many succeeded.
RACER = _PRELUDE + r"""
ledger = PrivacyLedger.open(path, identity=identity)
event = PoissonSampledGaussian(noise_multiplier=4.0, sample_rate=1.0, steps=1)
print("ready", flush=True)
sys.stdin.readline()
count = 0
while True:
    try:
        ledger.charge(event, round_id=f"{tag}-{count}")
    except PrivacyBudgetExceeded:
        break
    count += 1
print(count, flush=True)
"""
RACE_EVENT = PoissonSampledGaussian(noise_multiplier=4.0, sample_rate=1.0, steps=1)


def spawn(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def read_line(child: subprocess.Popen[str], timeout: float = 60.0) -> str:
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline() if ready else ""
    if not line:
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"child produced no line; stderr:\n{err}")
    return line.strip()


def entry_count(path: Path) -> int:
    with PrivacyLedger.read(path, public_key=SITE.public()) as ledger:  # verifies everything
        return len(ledger.entries())


def test_killing_the_writer_at_random_moments_leaves_a_valid_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    rng = random.Random(2021)
    counts = [0]
    for attempt in range(5):
        child = spawn(WRITER, path, f"run{attempt}", 0.0, 0)
        assert read_line(child) == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        assert child.returncode == -signal.SIGKILL, "the writer died before it was killed"
        assert verify_ledger_file(path, SITE.public()) == []
        counts.append(entry_count(path))
        assert counts[-1] >= counts[-2], counts
    assert counts[-1] > counts[1] > 0, counts  # charges did happen between kills
    with PrivacyLedger.open(path, identity=SITE) as ledger:  # a writer carries on after the crashes
        ledger.charge(RACE_EVENT, round_id="after-crashes")
        assert ledger.verify() == []


def test_a_reader_sees_a_valid_prefix_while_a_writer_writes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    child = spawn(WRITER, path, "w", 0.01, 30)
    assert read_line(child) == "ready"
    seen: list[int] = []
    with PrivacyLedger.read(path, public_key=SITE.public()) as follower:
        while child.poll() is None:
            seen.append(entry_count(path))  # a fresh reader verifies the whole snapshot
            seen.append(len(follower.entries()))  # a long-lived one takes in the new rows
        _, err = child.communicate()
        assert child.returncode == 0, err
        assert len(follower.entries()) == 31 and follower.verify() == []
    assert seen == sorted(seen), "a reader saw the ledger shrink"
    assert len(set(seen)) >= 3, f"the reader never overlapped the writer: {sorted(set(seen))}"


def test_two_writers_racing_cannot_overspend_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    fits = 8
    low = compose_epsilon([RACE_EVENT] * fits, delta=DELTA, accountant="rdp")
    high = compose_epsilon([RACE_EVENT] * (fits + 1), delta=DELTA, accountant="rdp")
    budget = PrivacyBudget(epsilon=(low + high) / 2, delta=DELTA)
    PrivacyLedger.create(path, identity=SITE, budget=budget).close()
    racers = [spawn(RACER, path, name) for name in ("left", "right")]
    for racer in racers:
        assert read_line(racer) == "ready"
    for racer in racers:
        racer.stdin.write("go\n")
        racer.stdin.flush()
    charged = [int(read_line(racer)) for racer in racers]
    for racer in racers:
        _, err = racer.communicate()
        assert racer.returncode == 0, err
    assert sum(charged) == fits, charged
    with PrivacyLedger.read(path, public_key=SITE.public()) as ledger:
        assert len(ledger.entries()) == fits + 1 and ledger.verify() == []
        assert ledger.spent().epsilon <= budget.epsilon
