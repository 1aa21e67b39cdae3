"""Renyi differential privacy of our mechanisms, and its conversion to (epsilon, delta).

The RDP accountant tracks, for a fixed grid of Renyi orders alpha, an upper bound on the Renyi
divergence of the whole run; composition adds the per-event bounds order by order (Mironov 2017,
"Renyi Differential Privacy"), and the (epsilon, delta) guarantee is the best conversion over
the grid.

Poisson-subsampled Gaussian (DP-SGD): Mironov, Talwar and Zhang (2019), "Renyi Differential
Privacy of the Sampled Gaussian Mechanism". Under add/remove adjacency the order-alpha RDP is
log(A_alpha) / (alpha - 1) with A_alpha = E_{x ~ N(0, s^2)}[(1 - q + q exp((2x - 1) / (2 s^2)))^alpha].
At integer alpha the binomial expansion is a finite sum,
    A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 s^2)).
At fractional alpha the paper splits the integral at z0 = s^2 log(1/q - 1) + 1/2, where the
expansion converges on each side, giving two infinite series with erfc weights. For fractional
alpha the binomial coefficients C(alpha, k) alternate in sign once k > alpha + 1; we keep the
signs (summing magnitudes, as some implementations do, overstates the RDP at small orders by up to
a factor of 30 when q is large) and stop once the terms are shrinking and below 1e-10 of the
total, then add the first omitted terms and a rounding allowance so the value stays an upper
bound. An order whose series has not settled
after ``_MAX_SERIES_TERMS`` terms is dropped (set to infinity), which is safe: the conversion then
minimises over fewer orders.

Distributed discrete Gaussian: Kairouz, Liu and Steinke (2021), Proposition 14, evaluated by
``DistributedDiscreteGaussian.rdp``. We use it at the integer orders of the grid only, the orders
at which we read their bound as stated; fractional orders are set to infinity for such events.

Conversion: the improved RDP-to-DP bound of Balle et al. (2020), "Hypothesis Testing
Interpretations and Renyi Differential Privacy", and Canonne, Kamath and Steinke (2020), "The
Discrete Gaussian for Differential Privacy", Proposition 12:
    epsilon = rdp + log(1 - 1/alpha) - (log(delta) + log(alpha)) / (alpha - 1),
    log(delta) = (alpha - 1)(rdp - epsilon + log(1 - 1/alpha)) - log(alpha),
minimised over orders, together with the Bretagnolle-Huber bound delta(0) = TV <= sqrt(1 - e^-KL)
(KL <= the RDP at any order >= 1). The default order grid is the one dp-accounting's
RdpAccountant uses, so the two agree on the same events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import special

from ..errors import ConfigError
from .events import DistributedDiscreteGaussian, PoissonSampledGaussian, PrivacyEvent

__all__ = [
    "DEFAULT_ORDERS",
    "validate_orders",
    "sampled_gaussian_rdp",
    "event_rdp",
    "epsilon_from_rdp",
    "delta_from_rdp",
]

# Fine steps of 0.1 on (1, 11) where large-epsilon runs have their optimum, then every integer up
# to 63 and a few large powers of two for very small epsilons.
DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1.0 + tenth / 10.0 for tenth in range(1, 100))
    + tuple(float(order) for order in range(11, 64))
    + (128.0, 256.0, 512.0, 1024.0)
)

_MAX_SERIES_TERMS = 4096
# A series has settled once its newest terms are below 1e-10 (e^-23) of the total and shrinking.
_SERIES_LOG_TOLERANCE = 23.0
_ROUNDING_SLACK = math.log(1e-13)


def validate_orders(orders: Sequence[float]) -> tuple[float, ...]:
    """The orders as a tuple of floats; ConfigError unless all are finite and > 1."""
    values = tuple(float(order) for order in orders)
    bad = [order for order in values if not (math.isfinite(order) and order > 1.0)]
    if not values or bad:
        raise ConfigError(f"Renyi orders must be finite and > 1 (and at least one given), got {bad or 'none'}")
    return values


@lru_cache(maxsize=16)
def _integer_layout(int_orders: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flattened (alpha, k, log C(alpha, k)) for all integer orders, plus the segment starts."""
    lengths = np.array([order + 1 for order in int_orders])
    alpha = np.repeat(np.array(int_orders, dtype=np.float64), lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    k = np.arange(alpha.size, dtype=np.float64) - np.repeat(starts, lengths)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    for array in (alpha, k, log_binom, starts):
        array.setflags(write=False)
    return alpha, k, log_binom, starts


def _log_a_integer(q: float, sigma: float, int_orders: tuple[int, ...]) -> np.ndarray:
    # Since sum_k C(alpha, k)(1 - q)^(alpha - k) q^k = 1, A_alpha - 1 is the same sum with
    # exp(...) replaced by expm1(...): all terms are >= 0 and the k = 0, 1 terms vanish, so tiny
    # RDP values (small q) keep their relative precision instead of drowning in log(1 + tiny).
    alpha, k, log_binom, starts = _integer_layout(int_orders)
    exponent = (k * k - k) / (2.0 * sigma**2)
    with np.errstate(divide="ignore", over="ignore"):
        log_expm1 = np.where(exponent > 30.0, exponent + np.log1p(-np.exp(-exponent)), np.log(np.expm1(exponent)))
    terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + log_expm1
    peak = np.maximum.reduceat(terms, starts)
    lengths = np.diff(np.append(starts, terms.size))
    log_a_minus_1 = peak + np.log(np.add.reduceat(np.exp(terms - np.repeat(peak, lengths)), starts))
    return np.logaddexp(0.0, log_a_minus_1)


@lru_cache(maxsize=64)
def _fractional_coefficients(orders: tuple[float, ...], terms: int) -> tuple[np.ndarray, np.ndarray]:
    """log|C(alpha, i)| and the sign of C(alpha, i) for i < terms, one row per order."""
    alpha = np.array(orders)[:, None]
    i = np.arange(terms, dtype=np.float64)[None, :]
    # gammaln is log|Gamma|; C(alpha, i) takes the sign of Gamma(alpha - i + 1), which
    # alternates once i > alpha + 1.
    log_binom = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(alpha - i + 1)
    sign = special.gammasgn(alpha - i + 1)
    log_binom.setflags(write=False)
    sign.setflags(write=False)
    return log_binom, sign


def _row_logsumexp(terms: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    peak = np.max(terms, axis=1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    scaled = np.exp(terms - peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.sum(scaled if weights is None else scaled * weights, axis=1)) + peak[:, 0]


def _log_a_fractional(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """log A_alpha by the two erfc-weighted series of Mironov et al. (2019), Section 3.3."""
    z0 = sigma**2 * (math.log1p(-q) - math.log(q)) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    result = np.full(len(orders), np.inf)
    pending = np.arange(len(orders))
    terms_count = 128
    while pending.size and terms_count <= _MAX_SERIES_TERMS:
        log_binom, sign = _fractional_coefficients(tuple(orders[k] for k in pending), terms_count)
        alpha = np.array([orders[k] for k in pending])[:, None]
        i = np.arange(terms_count, dtype=np.float64)[None, :]
        j = alpha - i
        below = (log_binom + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2)
                 + special.log_ndtr((z0 - i) / sigma))
        above = (log_binom + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2)
                 + special.log_ndtr((j - z0) / sigma))
        every = np.concatenate((below, above), axis=1)
        magnitude = _row_logsumexp(every)
        signed = _row_logsumexp(every, np.concatenate((sign, sign), axis=1))
        newest = np.maximum(below[:, -1], above[:, -1])
        # Keep an upper bound: add the rounding error of the signed sum (relative to the sum of
        # magnitudes) and the two alternating tails, each at most its first omitted term.
        total = np.logaddexp(signed, np.logaddexp(magnitude + _ROUNDING_SLACK, newest + math.log(2.0)))
        shrinking = (below[:, -1] < below[:, -2]) & (above[:, -1] < above[:, -2])
        settled = shrinking & (newest < total - _SERIES_LOG_TOLERANCE) & ~np.isnan(signed)
        result[pending[settled]] = total[settled]
        pending = pending[~settled]
        terms_count *= 2
    return result


@lru_cache(maxsize=4096)
def _sampled_gaussian_rdp_cached(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    alphas = np.array(orders)
    if q == 1.0:
        rdp = alphas / (2.0 * sigma**2)
    else:
        is_int = alphas == np.round(alphas)
        log_a = np.empty(alphas.size)
        if is_int.any():
            log_a[is_int] = _log_a_integer(q, sigma, tuple(int(a) for a in alphas[is_int]))
        if (~is_int).any():
            log_a[~is_int] = _log_a_fractional(q, sigma, tuple(float(a) for a in alphas[~is_int]))
        # A_alpha >= 1 mathematically; rounding can dip just below, and 0 is the safe floor.
        rdp = np.maximum(log_a, 0.0) / (alphas - 1.0)
    rdp.setflags(write=False)
    return rdp


def sampled_gaussian_rdp(*, noise_multiplier: float, sample_rate: float,
                         orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of ONE step of the Poisson-subsampled Gaussian at each order (read-only array)."""
    problems = []
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        problems.append(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        problems.append(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    if problems:
        raise ConfigError(problems)
    return _sampled_gaussian_rdp_cached(float(sample_rate), float(noise_multiplier), validate_orders(orders))


@lru_cache(maxsize=1024)
def _ddg_rdp_cached(event: DistributedDiscreteGaussian, orders: tuple[float, ...]) -> np.ndarray:
    rdp = np.array([event.rdp(order) if order == round(order) else math.inf for order in orders])
    rdp.setflags(write=False)
    return rdp


def event_rdp(event: PrivacyEvent, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of all ``event.steps`` steps of ``event`` at each order (a new array)."""
    checked = validate_orders(orders)
    if isinstance(event, PoissonSampledGaussian):
        per_step = _sampled_gaussian_rdp_cached(float(event.sample_rate), float(event.noise_multiplier), checked)
    elif isinstance(event, DistributedDiscreteGaussian):
        per_step = _ddg_rdp_cached(event, checked)
    else:
        raise ConfigError(f"expected a privacy event from securefed.privacy.events, got {type(event).__name__}")
    return per_step * event.steps


def _as_arrays(orders: Sequence[float], rdp: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    alphas, values = np.asarray(orders, dtype=np.float64), np.asarray(rdp, dtype=np.float64)
    if alphas.shape != values.shape or alphas.ndim != 1 or alphas.size == 0:
        raise ConfigError(f"orders and rdp must be equal-length 1-d sequences, got shapes {alphas.shape} and {values.shape}")
    if not np.all(alphas > 1.0):
        raise ConfigError("every Renyi order must be > 1 for the RDP-to-DP conversion")
    if np.any(np.isnan(values)) or np.any(values < 0):
        raise ConfigError("RDP values must be >= 0 (or +inf); got a negative or NaN value")
    return alphas, values


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], *, delta: float) -> float:
    """Smallest epsilon over the orders such that (epsilon, delta)-DP follows; may be math.inf."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta must lie in (0, 1), got {delta!r}")
    alphas, values = _as_arrays(orders, rdp)
    finite = np.isfinite(values)
    if not finite.any():
        return math.inf
    a, r = alphas[finite], values[finite]
    # Bretagnolle-Huber: if delta already exceeds the total variation bound, epsilon 0 suffices.
    if np.any(delta**2 > -np.expm1(-r)):
        return 0.0
    eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    return float(max(0.0, eps.min()))


def delta_from_rdp(orders: Sequence[float], rdp: Sequence[float], *, epsilon: float) -> float:
    """Smallest delta over the orders such that (epsilon, delta)-DP follows."""
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0) or math.isnan(epsilon):
        raise ConfigError(f"epsilon must be a number >= 0, got {epsilon!r}")
    alphas, values = _as_arrays(orders, rdp)
    finite = np.isfinite(values)
    if not finite.any():
        return 1.0
    if math.isinf(epsilon):
        return 0.0
    a, r = alphas[finite], values[finite]
    with np.errstate(divide="ignore", over="ignore"):
        total_variation = 0.5 * np.log(-np.expm1(-r))
    conversion = (a - 1.0) * (r - epsilon + np.log1p(-1.0 / a)) - np.log(a)
    return float(min(1.0, math.exp(min(total_variation.min(), conversion.min()))))
