"""Speed of the privacy building blocks, each as a ratio against a numpy baseline in the same run.

- Discrete Gaussian sampling (1e6 values) against numpy's continuous Gaussian sampler: the price
  of exact-integer noise.
- Distributed-DP encoding of a 1e6-float update (clip, rotate, round, noise, reduce) against one
  float64 Walsh-Hadamard-sized pass of numpy (the sum of ``x * x``), i.e. a memory-bound floor.
- The notebook helpers: ``epsilon`` with RDP and 1e4 steps with PLD, against one
  ``scipy.special.erfc`` call on a 1e5 grid (a fixed numerical workload that scales with the
  machine).
"""

from __future__ import annotations

import time

import numpy as np
from scipy import special

from securefed.primitives.randomness import SeededRandom
from securefed.privacy import DistributedDPConfig, DistributedDPEncoder, compose_epsilon, epsilon
from securefed.privacy.discrete_gaussian import sample_discrete_gaussian
from securefed.privacy.events import PoissonSampledGaussian
from securefed.privacy.pld import single_step

N = 1_000_000


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_discrete_gaussian_sampler(benchmark, run_pedantic, report):
    benchmark.group = "privacy: noise"
    rng = SeededRandom("bench")
    generator = np.random.default_rng(0)
    baseline = _best_of(lambda: generator.normal(0.0, 1e4, size=N))
    _, ours = run_pedantic(sample_discrete_gaussian, args=(1e4, N, rng), rounds=3, warmup_rounds=1)
    report(name="discrete Gaussian 1e6 samples", ours=ours, baseline=baseline, ratio=ours / baseline,
           ratio_means="ours / numpy normal", target=None, rounds=3)


def test_distributed_encoding(benchmark, run_pedantic, report):
    benchmark.group = "privacy: distributed DP"
    config = DistributedDPConfig(l2_clip=1.0, noise_multiplier=1.0, expected_sites=10, min_sites=7)
    encoder = DistributedDPEncoder(config, dimension=N)
    update = np.random.default_rng(0).normal(size=N)
    update /= np.linalg.norm(update)
    rng = SeededRandom("bench")
    baseline = _best_of(lambda: np.dot(update, update))
    _, ours = run_pedantic(lambda: encoder.encode(update, round_seed=b"r" * 32, rng=rng), rounds=3, warmup_rounds=1)
    report(name="distributed DP encode 1e6 floats", ours=ours, baseline=baseline, ratio=ours / baseline,
           ratio_means="ours / one float64 pass", target=None, rounds=3)


def test_accounting_helpers(benchmark, run_pedantic, report):
    benchmark.group = "privacy: accounting"
    grid = np.linspace(-10, 10, 100_000)
    baseline = _best_of(lambda: special.erfc(grid))

    def account() -> None:
        single_step.cache_clear()
        epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=1e-5)
        compose_epsilon([PoissonSampledGaussian(noise_multiplier=0.93, sample_rate=0.004, steps=10_000)],
                        delta=1e-6, accountant="pld")

    _, ours = run_pedantic(account, rounds=3, warmup_rounds=0)
    report(name="epsilon (rdp) + 1e4-step PLD", ours=ours, baseline=baseline, ratio=ours / baseline,
           ratio_means="ours / erfc on 1e5 points", target=None, rounds=3)
