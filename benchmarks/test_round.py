"""A full ``secure_sum`` round against the round's keystream floor, measured in the same test.

The floor is the mask expansion no implementation of the protocol can avoid: with no dropouts,
every site expands its self mask and one pairwise mask per neighbour, and the coordinator
re-expands every survivor's self mask, so a round expands

    floor_streams = n * (k + 1) + n      streams of (length + 1) words

(k = n - 1 for the complete graph, the graph's degree for a sparse one; the extra word carries
the masked weight). The floor is that many raw AES-256-CTR keystreams from ``cryptography``, one
fresh key each, into a preallocated buffer: a sample of them is timed (fastest of a few passes)
and scaled linearly to the full count.

ratio = round time / floor time (target <= 2.0). Each case runs twice: ``workers=1`` (one
thread, directly comparable to the single-threaded floor) and the default ``workers`` (a thread
pool; still divided by the single-threaded floor, so threads can push the ratio down).
Each round runs once (``rounds=1``): the largest case takes 10-20 seconds per run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from securefed.secagg import recipes
from securefed.secagg.config import SecAggConfig
from securefed.secagg.recipes import secure_sum

CASES = [  # (sites, length, neighbours)
    (10, 1_000_000, None),
    (40, 1_000_000, None),
    (100, 100_000, None),
    (100, 100_000, "auto"),
    (1000, 100_000, "auto"),
]
WORKERS = [1, None]  # None: secure_sum's default thread pool

# The floor is timed on at most this many streams and this many bytes per pass, then scaled.
FLOOR_SAMPLE_STREAMS = 2000
FLOOR_SAMPLE_BYTES = 512 << 20
FLOOR_REPEATS = 3


def _default_workers() -> int | None:
    pick = getattr(recipes, "_default_workers", None)
    return pick(None) if pick is not None else None


def _short(length: int) -> str:
    return f"{length:.0e}".replace("+0", "").replace("+", "")


def _case_id(n: int, length: int, k) -> str:
    return f"n{n}-L{_short(length)}-{'complete' if k is None else k}"


def _params():
    for n, length, k in CASES:
        for workers in WORKERS:
            tag = "workers1" if workers == 1 else "workersdefault"
            yield pytest.param(n, length, k, workers, id=f"{_case_id(n, length, k)}-{tag}")


class _Inputs:
    """Uniform float32 inputs in [-1, 1], generated before timing; the latest set is reused."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._value: np.ndarray | None = None

    def get(self, n: int, length: int) -> np.ndarray:
        if self._key != (n, length):
            self._value = None  # free the previous set before making the next
            rng = np.random.default_rng(20240601 + n)
            self._value = rng.random((n, length), dtype=np.float32) * np.float32(2) - np.float32(1)
            self._key = (n, length)
        assert self._value is not None
        return self._value


@pytest.fixture(scope="module")
def inputs() -> _Inputs:
    # One tiny untimed round first, so no timed round pays the one-time costs of a process
    # (lazy imports, first-use tables and buffers).
    warm = np.random.default_rng(0).random((3, 1000), dtype=np.float32)
    secure_sum(warm, SecAggConfig(), seed=0, keep_messages=False, workers=1)
    return _Inputs()


def _floor(keystream, streams: int, stream_bytes: int) -> tuple[float, int]:
    sample = min(streams, FLOOR_SAMPLE_STREAMS, max(32, FLOOR_SAMPLE_BYTES // stream_bytes))
    rng = np.random.default_rng(7)
    keys = [rng.bytes(32) for _ in range(sample)]
    keystream.buffers(stream_bytes)
    per_pass = keystream.time_many(keys, stream_bytes, repeats=FLOOR_REPEATS)
    return per_pass * streams / sample, sample


@pytest.mark.parametrize(("n", "length", "neighbors", "workers"), list(_params()))
def test_secure_sum_round_vs_keystream_floor(benchmark, keystream, run_pedantic, report, inputs,
                                            n, length, neighbors, workers):
    benchmark.group = f"secure_sum round {_case_id(n, length, neighbors)}"
    vectors = inputs.get(n, length)
    config = SecAggConfig(neighbors=neighbors)

    result, ours = run_pedantic(
        secure_sum, args=(vectors, config), kwargs={"seed": 0, "keep_messages": False, "workers": workers},
    )

    # A fast wrong answer is not a result: check the sum (outside the timed region).
    assert result.survivors == set(range(n))
    bound = recipes.expected_error_bound(result.config, n) + 1e-9 * n
    error = float(np.max(np.abs(result.total - vectors.sum(axis=0, dtype=np.float64))))
    assert error <= bound, f"secure_sum is off by {error} (bound {bound})"

    k = n - 1 if result.config.neighbors is None else result.config.neighbors
    word_bytes = result.config.bit_width // 8
    stream_bytes = (length + 1) * word_bytes
    streams = n * (k + 1) + n
    floor, sample = _floor(keystream, streams, stream_bytes)

    upload = result.coordinator_view.upload_bytes(0)
    per_param = upload / length
    overhead = upload - word_bytes * length
    threads = workers if workers is not None else _default_workers()
    label_workers = "workers=1" if workers == 1 else f"workers=default ({threads} threads)"
    graph = "complete" if result.config.neighbors is None else f"k={k}"
    report(
        name=f"round n={n} L={_short(length)} {'complete' if neighbors is None else 'auto'} {label_workers}",
        ours=ours, baseline=floor, ratio=ours / floor, ratio_means="round / 1-thread AES floor",
        target=("<=", 2.0),
        sites=n, length=length, neighbors_requested=str(neighbors), neighbors=k,
        threshold=result.config.threshold, workers=threads, bit_width=result.config.bit_width,
        floor_streams=streams, floor_stream_bytes=stream_bytes, floor_sample_streams=sample,
        upload_bytes_site0=upload, upload_bytes_per_param=per_param, upload_overhead_bytes=overhead,
        upload_target="<= 4 bytes/param at b=32", max_abs_error=error,
        notes=[
            f"{graph} t={result.config.threshold}; floor = {streams} streams x {stream_bytes} B "
            f"(timed {sample}, scaled); upload {per_param:.6f} B/param "
            f"({word_bytes} B/word + {overhead} B per message)"
        ],
    )
    assert math.isfinite(ours) and ours > 0
