"""Samplers for the discrete Gaussian N_Z(0, sigma^2): P(x) proportional to exp(-x^2 / (2 sigma^2)).

Both samplers follow Canonne, Kamath and Steinke (2020), "The Discrete Gaussian for
Differential Privacy": propose from a discrete Laplace of integer scale t = floor(sigma) + 1 and
accept y with probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)). The discrete Laplace is itself
built from a uniform U in {0, ..., t-1} kept with probability exp(-U/t), a geometric V with
P(V >= v) = exp(-v), and a random sign (rejecting "-0" so zero is not counted twice), giving
Y = +-(U + t V) with P(Y = y) proportional to exp(-|y| / t).

* :func:`sample_discrete_gaussian_exact` is the paper's exact algorithm: every Bernoulli(exp(-g))
  for rational g is decided with integer arithmetic (Bernoulli(g/k) for k = 1, 2, ... until the
  first failure; the count's parity is Bernoulli(exp(-g)) for g in [0, 1], and larger g is split
  into Bernoulli(exp(-1)) factors), using only uniform integers from the RandomSource. No floats,
  so no floating-point leakage, but a Python loop per sample: use it for small n and as the
  reference the fast sampler is tested against.
* :func:`sample_discrete_gaussian` runs the same rejection structure on whole numpy arrays. The
  uniform U is an exact integer (``uniform_below``), so outputs are exact integers at any sigma
  (no float granularity above 2**53), but the Laplace and Gaussian acceptance decisions compare a
  53-bit uniform with a float64 probability, and V is ``floor(-log1p(-u))`` of a 53-bit uniform
  (so V <= 36). Its output is therefore not exactly N_Z(0, sigma^2); unlike float Laplace noise
  (Mironov 2012, "On Significance of the Least Significant Bits for Differential Privacy") the
  released values are integers, with no low-order bits to leak, but the distance must be paid
  for in delta. :func:`fast_sampler_tv_bound` bounds it, and :data:`FAST_SAMPLER_TV_BOUND` is
  at least that bound at every sigma.

The bound (per output coordinate). Couple each 53-bit coin with a continuous uniform U (the coin
is floor(2^53 U) / 2^53) and run the ideal algorithm, which decides with exact probabilities, on
the same U's; the outputs differ only if some proposal's decisions differ before the ideal run
accepts. A proposal leaves the two runs together unless one of them accepts it, so with u =
2^-53 and every float exp / log1p call assumed within 4 ulp (relative rho = 8u; correctly rounded
is 1/2 ulp, glibc and numpy's SIMD versions are within about 1):

* Laplace test, "U < exp(-j/t)": the float argument errs by at most 3.02u and exp by rho, and
  the coin's grid adds u: at most 4.02u + 1.001 rho.
* Gaussian test, "U < exp(-x)", x = (m - sigma^2/t)^2 / (2 sigma^2): rounding in forming x
  shifts it by at most u (7.02 x + 4.01 sqrt(2x)) (m near sigma^2/t cancels, which the sqrt term
  covers), so the probability moves by at most e^-x times that, at most 5.02u over all x, plus
  rho and the grid's u: at most 6.03u + 1.001 rho.
* Geometric V: at threshold v the float and exact values of -log(1 - U) can fall on different
  sides of v only within a band of probability 2.01 v rho e^-v, plus 2u for the coin's grid
  (near the top one grid step moves -log(1 - U) by up to 1/2, never by 1, so the runs' V differ
  by at most one). Such a pair of runs splits only if one accepts the larger of the two
  proposals, whose Gaussian test passes with probability at most B_v = exp(-(v - 2)^2 / 2) for
  v >= 2 (since t > sigma) and 1 for v = 1; summing, 2.01 rho sum v e^-v B_v + 2u sum B_v
  <= 1.49 rho + 5.51u. (V >= 37, impossible for the float run, has probability e^-37 B_37 ~ 0.)
  The sign test compares with 1/2, which the grid represents exactly.

So one proposal splits the runs with probability at most 15.56u + 3.49 rho = 43.5u. The ideal
run accepts each proposal with probability W = (1 - e^-1) Z / (2t) * exp(-sigma^2 / (2 t^2)),
Z = sum_y exp(-y^2 / (2 sigma^2)) >= max(1, sqrt(2 pi) sigma) (by Poisson summation), so
W >= 0.19 at any sigma and >= 0.46 for sigma >= 4; the runs split with probability at most
43.5u / W per output (about 2.5e-14 at worst, 1e-14 at sigma >= 4), and by a union bound n
outputs are within n times that in total variation of n exact draws. A mechanism whose noise is
eta-close in total variation to the ideal one stays (epsilon, delta + (1 + e^epsilon) eta)-DP;
the accountants charge this through ``DistributedDiscreteGaussian.sampler_tv``. (The actual
distance is far smaller, 4e-17 to 6e-17 per coordinate at sigma 0.8 to 10 by exact enumeration
of the coins, but the bound is what can be certified without enumerating.)
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import numpy as np

from ..errors import ConfigError
from ..primitives.randomness import RandomSource, uniform_below, uniform_floats

__all__ = [
    "MAX_SIGMA",
    "FAST_SAMPLER_TV_BOUND",
    "fast_sampler_tv_bound",
    "sample_discrete_gaussian",
    "sample_discrete_gaussian_exact",
    "sample_bernoulli_exp",
    "sample_discrete_laplace_exact",
    "discrete_gaussian_pmf",
    "discrete_gaussian_normalizer",
]

# Proposals reach |y| < 37 t (V <= 36); keeping 37 t below 2**63 keeps every value an exact int64.
MAX_SIGMA = float(2**56)
# Below this sigma the normaliser is summed term by term; above it Poisson summation is exact
# to double precision (its first correction, 2 exp(-2 pi^2 sigma^2), is below 1e-130).
_DIRECT_SUM_SIGMA = 4.0
# Bytes fetched per call by the exact sampler, which needs many tiny uniform integers.
_EXACT_CHUNK = 4096
# Probability that one proposal of the fast sampler splits it from the exact one: 15.56 u +
# 3.49 rho with u = 2^-53 and rho = 8u (see the module docstring), rounded up.
_SPLIT_PER_PROPOSAL = 43.6 * 2.0**-53
# The ideal acceptance rate is at least this at any sigma (its minimum, sigma just below 1).
_MIN_ACCEPTANCE = -math.expm1(-1.0) / 2.0 * math.exp(-0.5)
FAST_SAMPLER_TV_BOUND = _SPLIT_PER_PROPOSAL / _MIN_ACCEPTANCE * (1.0 + 1e-9)


def _check_count(n: object, problems: list[str]) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        problems.append(f"n must be an int >= 0, got {n!r}")


def _check_rng(rng: object, problems: list[str]) -> None:
    if not isinstance(rng, RandomSource):
        problems.append(f"rng must be a RandomSource (SeededRandom or SystemRandom), got {type(rng).__name__}")


def _check_sigma(sigma: object, problems: list[str]) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        problems.append(f"sigma must be a real number, got {type(sigma).__name__}")
    elif not (math.isfinite(sigma) and 0 < sigma <= MAX_SIGMA):
        problems.append(f"sigma must be finite and in (0, 2**56], got {sigma!r}")


# ---------------------------------------------------------------------------------------------
# The exact sampler (integer arithmetic only).


class _IntegerDraws:
    """Uniform integers below arbitrary bounds, served from buffered random bytes."""

    def __init__(self, rng: RandomSource) -> None:
        self._rng = rng
        self._buffer = b""
        self._position = 0

    def _take(self, size: int) -> bytes:
        if self._position + size > len(self._buffer):
            self._buffer = self._buffer[self._position :] + self._rng.random_bytes(max(_EXACT_CHUNK, size))
            self._position = 0
        start = self._position
        self._position += size
        return self._buffer[start : self._position]

    def below(self, bound: int) -> int:
        """A uniform integer in [0, bound), by masked rejection (acceptance > 1/2)."""
        if bound == 1:
            return 0
        bits = (bound - 1).bit_length()
        mask = (1 << bits) - 1
        size = (bits + 7) // 8
        while True:
            value = int.from_bytes(self._take(size), "little") & mask
            if value < bound:
                return value

    def bernoulli(self, numerator: int, denominator: int) -> bool:
        """True with probability numerator / denominator (0 <= numerator <= denominator)."""
        return self.below(denominator) < numerator


def _bernoulli_exp_at_most_one(draws: _IntegerDraws, numerator: int, denominator: int) -> bool:
    # CKS 2020 Algorithm 1: P(K > k) = g^k / k!, so P(K odd) = sum_j (-g)^j / j! = exp(-g).
    k = 1
    while draws.bernoulli(numerator, denominator * k):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(draws: _IntegerDraws, numerator: int, denominator: int) -> bool:
    """True with probability exp(-numerator / denominator), for a non-negative rational."""
    whole, remainder = divmod(numerator, denominator)
    # exp(-g) = exp(-1)^floor(g) * exp(-(g - floor(g))); stop at the first failing factor.
    for _ in range(whole):
        if not _bernoulli_exp_at_most_one(draws, 1, 1):
            return False
    return _bernoulli_exp_at_most_one(draws, remainder, denominator)


def _discrete_laplace(draws: _IntegerDraws, scale: int) -> int:
    """CKS 2020 Algorithm 2 for integer scale t: P(y) proportional to exp(-|y| / t)."""
    while True:
        u = draws.below(scale)
        if not _bernoulli_exp(draws, u, scale):
            continue
        v = 0
        while _bernoulli_exp_at_most_one(draws, 1, 1):
            v += 1
        magnitude = u + scale * v
        negative = draws.below(2) == 1
        if negative and magnitude == 0:
            continue  # -0 and +0 are one outcome; keep its probability that of any other |y|
        return -magnitude if negative else magnitude


def _exact_sigma_squared(sigma_squared: object, problems: list[str]) -> Fraction | None:
    if isinstance(sigma_squared, bool) or not isinstance(sigma_squared, numbers.Rational):
        hint = " (use fractions.Fraction(str(x)) to state the exact value)" if isinstance(sigma_squared, float) else ""
        problems.append(f"sigma_squared must be an int or Fraction, got {type(sigma_squared).__name__}{hint}")
        return None
    value = Fraction(sigma_squared)
    if value <= 0:
        problems.append(f"sigma_squared must be > 0, got {value}")
        return None
    return value


def sample_discrete_gaussian_exact(sigma_squared: Fraction | int, n: int, rng: RandomSource) -> list[int]:
    """Return ``n`` exact samples of N_Z(0, sigma_squared) (CKS 2020, Algorithm 3).

    ``sigma_squared`` must be an int or Fraction so that every step is exact rational
    arithmetic; the randomness is uniform integers drawn from ``rng``'s bytes.
    """
    problems: list[str] = []
    value = _exact_sigma_squared(sigma_squared, problems)
    _check_count(n, problems)
    _check_rng(rng, problems)
    if problems or value is None:
        raise ConfigError(problems)
    p, q = value.numerator, value.denominator
    # floor(sqrt(p/q)) == isqrt(floor(p/q)) for non-negative reals.
    t = math.isqrt(p // q) + 1
    draws = _IntegerDraws(rng)
    out: list[int] = []
    for _ in range(int(n)):
        while True:
            y = _discrete_laplace(draws, t)
            # gamma = (|y| - sigma^2/t)^2 / (2 sigma^2) = (|y| q t - p)^2 / (2 p q t^2).
            offset = abs(y) * q * t - p
            if _bernoulli_exp(draws, offset * offset, 2 * p * q * t * t):
                out.append(y)
                break
    return out


def sample_bernoulli_exp(gamma: Fraction | int, n: int, rng: RandomSource) -> list[bool]:
    """Return ``n`` exact draws of Bernoulli(exp(-gamma)) for a rational ``gamma >= 0``.

    The building block of the exact sampler, exposed so it can be tested on its own.
    """
    problems: list[str] = []
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Rational) or gamma < 0:
        problems.append(f"gamma must be an int or Fraction >= 0, got {gamma!r}")
    _check_count(n, problems)
    _check_rng(rng, problems)
    if problems:
        raise ConfigError(problems)
    g = Fraction(gamma)
    draws = _IntegerDraws(rng)
    return [_bernoulli_exp(draws, g.numerator, g.denominator) for _ in range(int(n))]


def sample_discrete_laplace_exact(scale: int, n: int, rng: RandomSource) -> list[int]:
    """Return ``n`` exact draws with P(y) proportional to exp(-|y| / scale), integer ``scale >= 1``."""
    problems: list[str] = []
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        problems.append(f"scale must be an int >= 1, got {scale!r}")
    _check_count(n, problems)
    _check_rng(rng, problems)
    if problems:
        raise ConfigError(problems)
    draws = _IntegerDraws(rng)
    return [_discrete_laplace(draws, scale) for _ in range(int(n))]


# ---------------------------------------------------------------------------------------------
# The vectorised sampler (same structure, float64 acceptance probabilities).


def _proposals(sigma: float, t: int, count: int, rng: RandomSource) -> np.ndarray:
    """``count`` discrete Laplace(t) proposals, each kept only if the Gaussian test accepts it."""
    u = uniform_below(rng, t, count).astype(np.int64)
    # Four uniforms per proposal: Laplace acceptance, geometric, sign, Gaussian acceptance.
    coins = uniform_floats(rng, 4 * count).reshape(4, count)
    keep = coins[0] < np.exp(-u / t)
    v = np.floor(-np.log1p(-coins[1])).astype(np.int64)
    magnitude = u + t * v
    negative = coins[2] < 0.5
    keep &= ~(negative & (magnitude == 0))
    # Work in float only for the acceptance probability; the sample itself stays an integer.
    distance = magnitude.astype(np.float64) - sigma * sigma / t
    keep &= coins[3] < np.exp(-(distance * distance) / (2.0 * sigma * sigma))
    accepted = magnitude[keep]
    np.negative(accepted, out=accepted, where=negative[keep])
    return accepted


def fast_sampler_tv_bound(sigma: float) -> float:
    """Total-variation distance bound of one :func:`sample_discrete_gaussian` output (module docstring)."""
    problems: list[str] = []
    _check_sigma(sigma, problems)
    if problems:
        raise ConfigError(problems)
    sigma = float(sigma)
    t = math.floor(sigma) + 1
    normalizer = max(1.0, math.sqrt(2.0 * math.pi) * sigma)
    acceptance = -math.expm1(-1.0) * normalizer / (2.0 * t) * math.exp(-(sigma * sigma) / (2.0 * t * t))
    # Rounded up a little so that rounding here cannot shave the bound.
    return _SPLIT_PER_PROPOSAL / acceptance * (1.0 + 1e-9)


def sample_discrete_gaussian(sigma: float, n: int, rng: RandomSource) -> np.ndarray:
    """Return ``n`` samples of N_Z(0, sigma^2) as an int64 array (vectorised CKS 2020).

    Fast (about 0.2 s per million on one core). Deviates from the exact distribution only
    through float64 acceptance probabilities: each output is within
    ``fast_sampler_tv_bound(sigma)`` of N_Z(0, sigma^2) in total variation (module docstring).
    """
    problems: list[str] = []
    _check_sigma(sigma, problems)
    _check_count(n, problems)
    _check_rng(rng, problems)
    if problems:
        raise ConfigError(problems)
    sigma, n = float(sigma), int(n)
    t = math.floor(sigma) + 1
    # A proposal survives both tests with probability from about 0.3 (small sigma) to 0.48 (large);
    # asking for a few more than needed makes a second pass uncommon.
    rate = 0.3 if sigma < 1.5 else 0.45
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        missing = n - filled
        accepted = _proposals(sigma, t, int(missing / rate) + 64, rng)[:missing]
        out[filled : filled + accepted.size] = accepted
        filled += accepted.size
    return out


# ---------------------------------------------------------------------------------------------
# The probability mass function (for tests and for checking samplers).


def discrete_gaussian_normalizer(sigma: float) -> float:
    """Return sum over all integers y of exp(-y^2 / (2 sigma^2))."""
    problems: list[str] = []
    _check_sigma(sigma, problems)
    if problems:
        raise ConfigError(problems)
    sigma = float(sigma)
    if sigma < _DIRECT_SUM_SIGMA:
        # Terms beyond 15 sigma (+ 15) are below 1e-48 of the total.
        cutoff = math.ceil(15 * sigma) + 15
        terms = [math.exp(-(y * y) / (2 * sigma * sigma)) for y in range(1, cutoff + 1)]
        return 1.0 + 2.0 * math.fsum(terms)
    # Poisson summation: sum_y exp(-y^2/(2 s^2)) = sqrt(2 pi) s sum_k exp(-2 pi^2 s^2 k^2).
    corrections = [2.0 * math.exp(-2.0 * math.pi**2 * sigma**2 * k * k) for k in (1, 2, 3)]
    return math.sqrt(2.0 * math.pi) * sigma * (1.0 + math.fsum(corrections))


def discrete_gaussian_pmf(sigma: float, support: np.ndarray | list[int] | int) -> np.ndarray:
    """Return P(X = y) for X ~ N_Z(0, sigma^2) at every integer y of ``support`` (float64)."""
    values = np.asarray(support)
    if values.dtype.kind not in "iu":
        raise ConfigError(f"support must hold integers, got dtype {values.dtype}")
    norm = discrete_gaussian_normalizer(sigma)
    y = values.astype(np.float64)
    return np.exp(-(y * y) / (2.0 * float(sigma) ** 2)) / norm
