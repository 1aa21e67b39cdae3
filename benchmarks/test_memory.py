"""Peak memory of a site's masking: ``MaskAccumulator`` applying many masks stays O(length).

A site folds its self mask and one pairwise mask per neighbour into one accumulator. The peak
memory ``tracemalloc`` sees while building the accumulator and applying the masks (numpy
reports its array buffers to ``tracemalloc``) is reported as a multiple of the accumulator's
own size: it must stay about the same, between 1 and 2, however many masks are applied, i.e.
no mask is ever materialised at full length. The time pytest-benchmark records here is run
under ``tracemalloc`` and is not a performance figure.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from securefed.primitives.prg import MaskAccumulator

LENGTH = 1_000_000


def _seeds(count: int) -> list[bytes]:
    rng = np.random.default_rng(count)
    return [rng.bytes(32) for _ in range(count)]


def _warm_up() -> None:
    """Create the PRG's one-per-process state (its shared read-only zero chunk) before tracing.

    That chunk is allocated once for the whole process, not per accumulator or per mask, so it
    is left out of the per-site figure; without this, whichever test ran first would pay it.
    """
    MaskAccumulator(16, dtype=np.uint32).add(bytes(32))


def _peak_while_masking(seeds: list[bytes]) -> tuple[int, int]:
    """(peak traced bytes above what was traced before, accumulator bytes)."""
    _warm_up()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        acc = MaskAccumulator(LENGTH, dtype=np.uint32)
        for i, seed in enumerate(seeds):  # alternate like a site: + for higher peers, - for lower
            (acc.add if i % 2 == 0 else acc.subtract)(seed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before, acc.values.nbytes


@pytest.mark.parametrize("masks", [1, 100])
def test_mask_accumulator_peak_memory(benchmark, run_pedantic, report, masks):
    benchmark.group = "memory: MaskAccumulator, length 1e6 uint32"
    seeds = _seeds(masks)
    (peak, acc_bytes), _ = run_pedantic(_peak_while_masking, args=(seeds,))
    report(
        name=f"memory MaskAccumulator L=1e6, {masks} mask(s)",
        ours=float(peak), baseline=float(acc_bytes), unit="B", ratio=peak / acc_bytes,
        ratio_means="peak traced / accumulator", target=("<=", 2.0),
        masks=masks, length=LENGTH, peak_traced_bytes=peak, accumulator_bytes=acc_bytes,
        notes=["tracemalloc peak while building the accumulator and applying the masks "
               "(excludes the PRG's one-per-process shared zero chunk; time not meaningful)"],
    )
