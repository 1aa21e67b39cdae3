"""The discrete Gaussian samplers against first-principles probabilities (scipy for the tests)."""

from __future__ import annotations

import decimal
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from securefed.errors import ConfigError
from securefed.primitives.randomness import SeededRandom
from securefed.privacy.discrete_gaussian import (
    FAST_SAMPLER_TV_BOUND,
    MAX_SIGMA,
    fast_sampler_tv_bound,
    discrete_gaussian_normalizer,
    discrete_gaussian_pmf,
    sample_bernoulli_exp,
    sample_discrete_gaussian,
    sample_discrete_gaussian_exact,
    sample_discrete_laplace_exact,
)

P_THRESHOLD = 1e-4


def _reference_pmf(sigma: float) -> dict[int, float]:
    """P(y) of N_Z(0, sigma^2) by direct summation well past where terms underflow."""
    cutoff = math.ceil(40 * sigma) + 40
    weights = {y: math.exp(-(y * y) / (2 * sigma * sigma)) for y in range(-cutoff, cutoff + 1)}
    total = math.fsum(weights.values())
    return {y: w / total for y, w in weights.items()}


def _reference_laplace_pmf(scale: int) -> dict[int, float]:
    q = math.exp(-1.0 / scale)
    cutoff = 60 * scale
    return {y: (1 - q) / (1 + q) * q ** abs(y) for y in range(-cutoff, cutoff + 1)}


def _chi_square_p(samples: np.ndarray, pmf: dict[int, float], *, min_expected: float = 20.0) -> float:
    """Goodness of fit: single-value bins where expected counts are large, tails lumped."""
    n = samples.size
    central = sorted(y for y, p in pmf.items() if p * n >= min_expected)
    low, high = central[0], central[-1]
    observed = [np.count_nonzero(samples < low)]
    expected = [n * math.fsum(p for y, p in pmf.items() if y < low)]
    values, counts = np.unique(samples[(samples >= low) & (samples <= high)], return_counts=True)
    by_value = dict(zip(values.tolist(), counts.tolist()))
    for y in central:
        observed.append(by_value.get(y, 0))
        expected.append(n * pmf[y])
    observed.append(np.count_nonzero(samples > high))
    expected.append(n * math.fsum(p for y, p in pmf.items() if y > high))
    # Tails with almost no mass are dropped rather than divided by ~0.
    keep = [i for i, e in enumerate(expected) if e >= 1.0]
    obs = np.array([observed[i] for i in keep], dtype=float)
    exp = np.array([expected[i] for i in keep])
    assert obs.sum() >= n - 2, "samples fell in bins with no probability mass"
    exp *= obs.sum() / exp.sum()
    return float(stats.chisquare(obs, exp).pvalue)


def _moments(pmf: dict[int, float]) -> tuple[float, float]:
    variance = math.fsum(p * y * y for y, p in pmf.items())
    fourth = math.fsum(p * y**4 for y, p in pmf.items())
    return variance, fourth


def _check_mean_and_variance(samples: np.ndarray, pmf: dict[int, float]) -> None:
    n = samples.size
    variance, fourth = _moments(pmf)
    assert abs(samples.mean()) < 5 * math.sqrt(variance / n)
    # Standard error of the second moment about the known mean 0.
    empirical = float(np.mean(samples.astype(float) ** 2))
    assert abs(empirical - variance) < 5 * math.sqrt((fourth - variance**2) / n)


@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0, 3.9, 4.0, 4.1, 17.0, 250.0])
def test_pmf_matches_direct_summation(sigma: float) -> None:
    reference = _reference_pmf(sigma)
    support = np.arange(-int(10 * sigma) - 5, int(10 * sigma) + 6)
    ours = discrete_gaussian_pmf(sigma, support)
    expected = np.array([reference[int(y)] for y in support])
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=0)


def test_normalizer_switches_method_seamlessly_and_variance_is_below_sigma_squared() -> None:
    # Just below and above the switch from direct summation to Poisson summation.
    assert discrete_gaussian_normalizer(3.999999) == pytest.approx(discrete_gaussian_normalizer(4.0), rel=1e-6)
    for sigma in (0.3, 0.5):
        variance, _ = _moments(_reference_pmf(sigma))
        assert variance < 0.95 * sigma**2
    variance, _ = _moments(_reference_pmf(0.8))
    assert 0.99 * 0.8**2 < variance < 0.8**2
    variance, _ = _moments(_reference_pmf(5.0))
    assert variance == pytest.approx(25.0, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.0, 2.5, 30.0])
def test_fast_sampler_fits_the_pmf(sigma: float) -> None:
    samples = sample_discrete_gaussian(sigma, 200_000, SeededRandom(f"fast-{sigma}"))
    assert samples.dtype == np.int64 and samples.shape == (200_000,)
    pmf = _reference_pmf(sigma)
    assert _chi_square_p(samples, pmf) > P_THRESHOLD
    _check_mean_and_variance(samples, pmf)
    # Tail mass beyond 2 sigma, against its binomial standard error.
    tail = math.fsum(p for y, p in pmf.items() if abs(y) >= 2 * sigma)
    observed = np.count_nonzero(np.abs(samples) >= 2 * sigma) / samples.size
    assert abs(observed - tail) < 5 * math.sqrt(tail * (1 - tail) / samples.size)


@pytest.mark.parametrize("sigma", [1e6, 2.0**40, 2.0**55])
def test_fast_sampler_at_large_sigma_is_gaussian_and_integer_exact(sigma: float) -> None:
    samples = sample_discrete_gaussian(sigma, 200_000, SeededRandom(f"large-{sigma}"))
    # At this scale the discrete Gaussian is the rounded normal (error ~exp(-2 pi^2 sigma^2)):
    # compare with 40 equiprobable bins of N(0, sigma^2).
    edges = stats.norm.ppf(np.linspace(0, 1, 41)[1:-1]) * sigma
    counts = np.bincount(np.searchsorted(edges, samples.astype(float)), minlength=40)
    assert stats.chisquare(counts).pvalue > P_THRESHOLD
    # Above 2**53 a float-based sampler could only return even numbers; ours stays exact.
    odd = np.count_nonzero(samples & 1) / samples.size
    assert abs(odd - 0.5) < 5 * math.sqrt(0.25 / samples.size)


@pytest.mark.parametrize("sigma_squared", [Fraction(1, 2), Fraction(9, 4), 40])
def test_exact_sampler_fits_the_pmf(sigma_squared: Fraction | int) -> None:
    samples = np.array(sample_discrete_gaussian_exact(sigma_squared, 20_000, SeededRandom(f"exact-{sigma_squared}")))
    pmf = _reference_pmf(math.sqrt(sigma_squared))
    assert _chi_square_p(samples, pmf) > P_THRESHOLD
    _check_mean_and_variance(samples, pmf)


def test_exact_sampler_handles_huge_rational_sigma() -> None:
    sigma_squared = Fraction(10**30, 3)
    samples = sample_discrete_gaussian_exact(sigma_squared, 2_000, SeededRandom("huge"))
    assert all(isinstance(s, int) for s in samples)
    sigma = math.sqrt(sigma_squared)
    # Standardised values: normal by a KS test, odd and even values both present.
    assert stats.kstest(np.array(samples, dtype=float) / sigma, "norm").pvalue > P_THRESHOLD
    assert 0 < sum(s % 2 for s in samples) < len(samples)


@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(1, 3), Fraction(1), Fraction(5, 2), 4])
def test_bernoulli_exp_has_the_exact_mean(gamma: Fraction | int) -> None:
    n = 40_000
    draws = sample_bernoulli_exp(gamma, n, SeededRandom(f"bern-{gamma}"))
    p = math.exp(-float(gamma))
    mean = sum(draws) / n
    if gamma == 0:
        assert mean == 1.0
    else:
        assert abs(mean - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("scale", [1, 3])
def test_exact_discrete_laplace_fits_its_pmf(scale: int) -> None:
    samples = np.array(sample_discrete_laplace_exact(scale, 30_000, SeededRandom(f"lap-{scale}")))
    assert _chi_square_p(samples, _reference_laplace_pmf(scale)) > P_THRESHOLD


def test_samplers_are_deterministic_per_seed() -> None:
    a = sample_discrete_gaussian(3.0, 1000, SeededRandom("same"))
    b = sample_discrete_gaussian(3.0, 1000, SeededRandom("same"))
    c = sample_discrete_gaussian(3.0, 1000, SeededRandom("other"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sample_discrete_gaussian_exact(9, 50, SeededRandom(1)) == sample_discrete_gaussian_exact(9, 50, SeededRandom(1))
    assert sample_discrete_gaussian(1.0, 0, SeededRandom(1)).shape == (0,)


def test_bad_input_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        sample_discrete_gaussian(-1.0, -5, "not an rng")  # type: ignore[arg-type]
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="2\\*\\*56"):
        sample_discrete_gaussian(MAX_SIGMA * 2, 1, SeededRandom(1))
    with pytest.raises(ConfigError, match="Fraction"):
        sample_discrete_gaussian_exact(2.25, 1, SeededRandom(1))  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        sample_discrete_gaussian_exact(Fraction(-1), True, None)  # type: ignore[arg-type]
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError):
        sample_bernoulli_exp(Fraction(-1, 2), 1, SeededRandom(1))
    with pytest.raises(ConfigError):
        sample_discrete_laplace_exact(0, 1, SeededRandom(1))
    with pytest.raises(ConfigError):
        discrete_gaussian_pmf(1.0, np.array([0.5]))
    with pytest.raises(ConfigError):
        discrete_gaussian_normalizer(float("nan"))


# ---------------------------------------------------------------------------------------------
# The fast sampler's distance from the exact distribution


_GRID = 2**53


def _p_coin_below(probability: float) -> Fraction:
    """P(u < p) for the sampler's coins u = k / 2^53, k uniform in [0, 2^53)."""
    return Fraction(min(_GRID, math.ceil(Fraction(probability) * _GRID)), _GRID)


def _geometric_thresholds() -> list[Fraction]:
    """P(V >= v), V = floor(-log1p(-u)) evaluated as the sampler does, by bisection on k."""
    tails = []
    for v in range(38):
        low, high = 0, _GRID
        while low < high:  # the least k whose float V is >= v
            middle = (low + high) // 2
            value = np.floor(-np.log1p(-np.array([middle * 2.0**-53])))[0]
            low, high = (low, middle) if value >= v else (middle + 1, high)
        tails.append(Fraction(_GRID - low, _GRID))
    return tails


def _fast_sampler_distribution(sigma: float) -> dict[int, Fraction]:
    """The fast sampler's exact output law: its float decisions replayed, the coins enumerated."""
    t = math.floor(sigma) + 1
    keep = [_p_coin_below(p) for p in np.exp(-np.arange(t, dtype=np.int64) / t)]
    tails = _geometric_thresholds()
    weights: dict[int, Fraction] = {}
    for v in range(37):
        chance_v = tails[v] - tails[v + 1]
        if chance_v == 0:
            continue
        magnitude = np.arange(t, dtype=np.int64) + t * v
        distance = magnitude.astype(np.float64) - sigma * sigma / t
        accept = np.exp(-(distance * distance) / (2.0 * sigma * sigma))
        for u in range(t):
            weight = Fraction(1, t) * keep[u] * chance_v * _p_coin_below(float(accept[u])) / 2
            y = int(magnitude[u])
            weights[y] = weights.get(y, 0) + weight
            if y:
                weights[-y] = weights.get(-y, 0) + weight
    total = sum(weights.values())
    return {y: w / total for y, w in weights.items()}


@pytest.mark.parametrize("sigma", [0.8, 2.5, 4.5])
def test_fast_sampler_is_within_its_certified_total_variation_bound(sigma: float) -> None:
    sampled = _fast_sampler_distribution(sigma)
    context = decimal.Context(prec=60)
    reach = 60 * (math.floor(sigma) + 1)
    exact = {y: context.exp(context.divide(-decimal.Decimal(y * y), 2 * decimal.Decimal(sigma) ** 2))
             for y in range(-reach, reach + 1)}
    total = sum(exact.values())
    def sampled_at(y: int) -> decimal.Decimal:
        p = sampled.get(y, Fraction(0))
        return context.divide(decimal.Decimal(p.numerator), decimal.Decimal(p.denominator))

    distance = sum(abs(sampled_at(y) - context.divide(w, total)) for y, w in exact.items()) / 2
    assert set(sampled) <= set(exact)
    assert 0 < distance <= fast_sampler_tv_bound(sigma), (sigma, distance)


@pytest.mark.parametrize("sigma", [0.05, 0.4, 0.99, 1.0, 1.5, 3.99, 4.0, 10.0, 1000.0])
def test_the_bounds_acceptance_rate_is_a_lower_bound(sigma: float) -> None:
    # The exact acceptance rate of one proposal, (1 - e^-1) / (2t) sum e^-|y|/t exp(-(|y| - s^2/t)^2 / 2s^2).
    t = math.floor(sigma) + 1
    reach = 60 * t
    rate = (1 - math.exp(-1)) / (2 * t) * math.fsum(
        math.exp(-abs(y) / t - (abs(y) - sigma * sigma / t) ** 2 / (2 * sigma * sigma)) for y in range(-reach, reach + 1))
    split = 43.5 * 2.0**-53  # per proposal, from the module's derivation
    assert fast_sampler_tv_bound(sigma) >= split / rate
    assert FAST_SAMPLER_TV_BOUND >= fast_sampler_tv_bound(sigma)
    with pytest.raises(ConfigError, match="sigma"):
        fast_sampler_tv_bound(-1.0)
