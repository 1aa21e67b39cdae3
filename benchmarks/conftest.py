"""Shared machinery of the benchmarks (secure aggregation, privacy, DP-SGD).

Every benchmark is reported as a ratio against a baseline measured in the same run (the raw
AES-256-CTR keystream of the ``cryptography`` package, or a size the result must stay near),
so the numbers mean the same on a laptop and on a server. Each test stores its ratio, its
baseline and its target in ``benchmark.extra_info`` (so they land in ``--benchmark-json``)
and in a table printed at the end of the session.

Run with ``make bench`` (``python -m pytest benchmarks -q --benchmark-only``). Pass
``--enforce-targets`` to turn a missed target into a test failure; by default a miss is only
flagged in the table, since timings on a shared machine are noisy.
"""

from __future__ import annotations

import os

# Pin the thread pools of any numerical library to one thread before numpy is imported, so
# the only concurrency in a run is what the code under test starts itself. The ops measured
# here (elementwise uint32 arithmetic, float conversions) are single-threaded in numpy anyway;
# this only keeps a BLAS pool from spinning up and competing for cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_var, "1")

import gc  # noqa: E402
import math  # noqa: E402
import operator  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import pytest  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

_COUNTER_ZERO = bytes(16)


# -- the baseline: raw AES-256-CTR keystream --------------------------------------------------
class Keystream:
    """Times the raw ``cryptography`` AES-256-CTR keystream on preallocated buffers.

    This is the floor every mask expansion is measured against: one fresh encryptor per
    32-byte key, counter block zero, ``update_into`` from a zero buffer into an output buffer,
    both allocated once outside the timed region.
    """

    def __init__(self) -> None:
        self._zeros: dict[int, bytes] = {}
        self._outs: dict[int, bytearray] = {}

    def buffers(self, nbytes: int) -> tuple[memoryview, memoryview]:
        if nbytes not in self._zeros:
            self._zeros[nbytes] = bytes(nbytes)
            self._outs[nbytes] = bytearray(nbytes)
        return memoryview(self._zeros[nbytes]), memoryview(self._outs[nbytes])

    def stream(self, key: bytes, nbytes: int) -> None:
        """One keystream of ``nbytes`` for ``key`` (the operation being timed)."""
        zeros, out = self.buffers(nbytes)
        Cipher(algorithms.AES(key), modes.CTR(_COUNTER_ZERO)).encryptor().update_into(zeros, out)

    def time_one(self, key: bytes, nbytes: int, *, repeats: int) -> float:
        """The fastest of ``repeats`` single keystreams of ``nbytes`` (seconds)."""
        zeros, out = self.buffers(nbytes)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            Cipher(algorithms.AES(key), modes.CTR(_COUNTER_ZERO)).encryptor().update_into(zeros, out)
            best = min(best, time.perf_counter() - start)
        return best

    def time_many(self, keys: list[bytes], nbytes: int, *, repeats: int) -> float:
        """The fastest of ``repeats`` passes, each one keystream of ``nbytes`` per key (seconds)."""
        zeros, out = self.buffers(nbytes)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for key in keys:
                Cipher(algorithms.AES(key), modes.CTR(_COUNTER_ZERO)).encryptor().update_into(zeros, out)
            best = min(best, time.perf_counter() - start)
        return best


@pytest.fixture(scope="session")
def keystream() -> Keystream:
    return Keystream()


# -- timing what pytest-benchmark measured ----------------------------------------------------
@pytest.fixture
def run_pedantic(benchmark):
    """``benchmark.pedantic`` that also returns the fastest round's time in seconds.

    With ``--benchmark-disable`` pytest-benchmark runs the target just once, cold; then the
    target is run ``rounds`` more times here and the fastest of those is returned, so the
    ratios stay meaningful. The target must tolerate being called that often.
    """

    def run(target: Callable, *, args=(), kwargs=None, rounds: int = 1, warmup_rounds: int = 0):
        kwargs = kwargs or {}
        gc.collect()
        result = benchmark.pedantic(target, args=args, kwargs=kwargs, rounds=rounds, iterations=1,
                                    warmup_rounds=warmup_rounds)
        stats = getattr(benchmark, "stats", None)
        if stats:
            return result, float(stats.stats.min)
        best = math.inf
        for _ in range(rounds):
            start = time.perf_counter()
            result = target(*args, **kwargs)
            best = min(best, time.perf_counter() - start)
        return result, best

    return run


# -- the ratio table --------------------------------------------------------------------------
_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass
class Row:
    name: str
    ours: float
    baseline: float
    unit: str
    ratio: float
    ratio_means: str
    target: tuple[str, float] | None
    notes: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target
        return bool(_OPS[op](self.ratio, bound))


_ROWS = pytest.StashKey[list]()


def _rows(config: pytest.Config) -> list[Row]:
    return config.stash.setdefault(_ROWS, [])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--enforce-targets",
        action="store_true",
        default=False,
        help="fail a benchmark whose ratio misses its target (default: only flag it in the table)",
    )


@pytest.fixture
def report(request, benchmark):
    """Record one benchmark's ratio: into ``benchmark.extra_info`` and the end-of-session table.

    ``ours`` and ``baseline`` are in ``unit`` (``"s"`` for times, ``"B"`` for bytes);
    ``ratio_means`` says how the ratio was formed (e.g. ``"baseline/ours"``); ``target`` is
    ``(">=", 0.9)`` or ``("<=", 2.0)`` or ``None`` for an informational ratio. ``extra`` goes
    into ``extra_info`` as is; ``notes`` are short strings shown next to the row.
    """

    def record(*, name: str, ours: float, baseline: float, ratio: float, ratio_means: str,
               target: tuple[str, float] | None, unit: str = "s", notes: list[str] | None = None,
               **extra) -> Row:
        row = Row(name=name, ours=ours, baseline=baseline, unit=unit, ratio=ratio,
                  ratio_means=ratio_means, target=target, notes=list(notes or []))
        info = benchmark.extra_info
        info["label"] = name
        info["ratio"] = round(ratio, 4)
        info["ratio_means"] = ratio_means
        info[f"ours_{unit}"] = ours
        info[f"baseline_{unit}"] = baseline
        if target is not None:
            info["target"] = f"{target[0]} {target[1]:g}"
            info["target_met"] = row.met
        info.update(extra)
        _rows(request.config).append(row)
        if row.met is False and request.config.getoption("enforce_targets"):
            pytest.fail(f"{name}: ratio {ratio:.3f} ({ratio_means}) misses target {target[0]} {target[1]:g}")
        return row

    return record


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        if value >= 1:
            return f"{value:.3f} s"
        if value >= 1e-3:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e6:.1f} us"
    if unit == "B":
        for step, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= step:
                return f"{value / step:.2f} {suffix}"
        return f"{value:.0f} B"
    return f"{value:g} {unit}"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """At the end of the session, print every benchmark's ratio (after pytest-benchmark's table)."""
    rows = _rows(config)
    if not rows:
        return
    header = ("benchmark", "ours", "baseline", "ratio", "ratio is", "target", "met")
    lines = []
    for r in rows:
        target = "-" if r.target is None else f"{r.target[0]} {r.target[1]:g}"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append((r.name, _fmt(r.ours, r.unit), _fmt(r.baseline, r.unit), f"{r.ratio:.3f}",
                      r.ratio_means, target, met))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    align = ["<", ">", ">", ">", "<", "<", "<"]

    def fmt(cols) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cols, align, widths)).rstrip()

    tr = terminalreporter
    tr.write_sep("=", "securefed benchmarks: ratios against baselines measured in this run")
    tr.write_line(fmt(header))
    tr.write_line(fmt(["-" * w for w in widths]))
    for row, cols in zip(rows, lines):
        tr.write_line(fmt(cols))
        for note in row.notes:
            tr.write_line(" " * 4 + note)
    missed = [r.name for r in rows if r.met is False]
    if missed:
        tr.write_line(f"{len(missed)} of {sum(r.met is not None for r in rows)} targets missed: " + "; ".join(missed))
