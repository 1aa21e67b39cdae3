"""Privacy loss distribution (PLD) accounting for the Poisson-subsampled Gaussian.

For a pair of output distributions (P, Q) the privacy loss L = log(dP/dQ), drawn under P, has
the hockey-stick divergence delta(eps) = E_P[(1 - e^(eps - L))_+] (+ P's mass where Q is zero);
composing mechanisms adds independent losses, so the loss distributions convolve (Meiser and
Mohammadi 2018, "Tight on Budget?"; Koskela, Jalko and Honkela 2020, "Computing Tight
Differential Privacy Guarantees Using FFT"). Under add/remove adjacency the subsampled Gaussian
has two directions, remove (P = (1-q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2)) and add (the two
swapped); like dp-accounting we compose each direction separately and report the worse one.

The discretisation of one step (:mod:`securefed.privacy.pld_discrete`) is "connect the dots"
(Doroshenko et al. 2022), an upper bound whose bias is second order in the grid spacing.

Composition is one FFT power per (sample rate, noise) group: all groups are wrapped onto a
common circular window that a Chernoff bound (from an upper bound on the discretised
distribution's moment generating function) shows holds all but a tiny mass of the composed
loss. Mass above the window would wrap around to low losses, so its Chernoff bound is added to
the infinite-loss mass.

Floating point. A float64 FFT leaves an absolute round-off of about u T times the largest bin in
every bin (u = 2^-53, T steps), so a far tail, where delta at small target deltas is decided,
drowns in it and delta can come out too small. Two measures keep every result an upper bound:

* Exponential tilting (the saddle-point device; convolution commutes with it): we compose the
  masses p(l) e^(lambda l) and untilt afterwards, so the tilted composition peaks near where
  delta is decided and that region keeps its relative precision. lambda comes from a fixed grid,
  at most where the Chernoff bound for the query is tightest: the least one whose round-off
  allowance (below) is estimated under 1e-3 of delta, with a larger reserve so that later, smaller
  deltas can reuse the cached composition. The share is checked after composing, and the query
  recomposed at the sharpest tilt if the estimate was wrong. Tilting only affects tightness.
* A certified round-off bound: the normwise FFT error analysis of Higham (2002, "Accuracy and
  Stability of Numerical Algorithms", ch. 24), taken generously as 32 u per stage, plus the
  error of the complex powers bounds the L2 norm E of the errors of the normalised tilted bins.
  Untilting scales the error at loss l by w(l), so by Cauchy-Schwarz the errors change delta(eps)
  by at most E ||w(l) (1 - e^(eps - l))||_2 over l > eps; delta adds exactly that (much less
  than E in every bin would cost), and a relative margin covers the rounding of the inputs, the
  untilting and the sums, so delta (and with it epsilon) is a certified upper bound. A
  composition whose error growth leaves this first-order analysis (T * max|dX| > 1%) is refused
  with a PrivacyError.

With a tilt, mass below the window wraps to high losses damped by e^(-lambda W) rather than
whole, so its Chernoff bound joins the infinite-loss mass when the window starts above zero loss
(below zero loss it never counts for epsilon >= 0); the window is also widened until the tilted
mass above it, which wraps to low losses amplified by e^(lambda W), is negligible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import fft, special

from ..errors import PrivacyError
from .pld_discrete import MAX_GRID_POINTS, UNIT_ROUNDOFF, Direction, DiscretePld, grid_interval, single_step

__all__ = ["Direction", "DiscretePld", "ComposedPld", "compose_sampled_gaussians", "single_step"]

# Mass of the composed loss allowed outside the circular window (bounded by Chernoff).
_WINDOW_TAIL = 1e-20
_CHERNOFF_T = np.geomspace(1e-3, 1e3, 37)
_MGF_BLOCKS = 1024
# Floating-point certification (see the module docstring): unit round-off, a generous normwise
# error per FFT stage (Higham 2002: about mu + gamma_4 (sqrt(2) + mu) for radix 2), the relative
# error of a complex power or product per step, and the error growth T * max|dX| beyond which
# the first-order analysis is not trusted.
_FFT_STAGE_ERROR = 32 * UNIT_ROUNDOFF
_POWER_ERROR = 8 * UNIT_ROUNDOFF
_MAX_ERROR_GROWTH = 0.01
# Candidate tilts (8 per decade; 0 = untilted is also used for delta queries below the mean).
_TILTS = np.geomspace(1e-2, 1e4, 49)
# The round-off floor may add at most this share of delta before a larger tilt is used.
_FLOOR_SHARE = 1e-3
# A query whose round-off share turns out above this is recomposed at its sharpest tilt.
_RETRY_SHARE = 1e-2
# A new composition aims at a floor this much lower still, so that later, smaller deltas reuse it.
_REUSE_MARGIN = 1e-2
# Tilting may widen the composition window up to this many points (more costs seconds).
_TILTED_POINTS = 1 << 22
# Compositions kept per ComposedPld (each holds up to a few hundred MB at the largest grids).
_CACHED_COMPOSITIONS = 4


# Small caches: entries keep single-step distributions (up to tens of MB each) alive.
@lru_cache(maxsize=8)
def _mgf_blocks(pld: DiscretePld) -> tuple[np.ndarray, ...]:
    """Per block: log mass, loss at its start, log(1 - f), log f and width (see _log_mgf_bound)."""
    size = pld.masses.size
    block = max(1, -(-size // _MGF_BLOCKS))
    starts = np.arange(0, size, block)
    pooled = np.add.reduceat(pld.masses, starts)
    moment = np.add.reduceat(pld.masses * np.arange(size, dtype=np.float64), starts)
    widths = (np.minimum(starts + block, size) - 1 - starts).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.clip(np.nan_to_num(np.where(widths > 0, (moment / pooled - starts) / widths, 0.0)), 0.0, 1.0)
        keep = pooled > 0  # empty blocks add nothing
        return (np.log(pooled[keep]), ((pld.offset + starts) * pld.interval)[keep], np.log1p(-share[keep]),
                np.log(share[keep]), (widths * pld.interval)[keep])


def _log_mgf_bound(pld: DiscretePld, t: np.ndarray) -> np.ndarray:
    """Upper bound on log sum_l p(l) e^(t l) of the finite part, for each t.

    The masses are pooled into at most _MGF_BLOCKS blocks of width w = b - a. e^(t l) is convex,
    so on [a, b] it lies below its chord, and a block's sum is at most its mass times
    (1 - f) e^(t a) + f e^(t b), f = (centroid - a) / w: a valid bound (Chernoff needs an upper
    bound) whose excess is second order, about (t w)^2 / 8 per step, instead of t w.
    """
    log_mass, start, log_lower, log_upper, width = _mgf_blocks(pld)
    t = t[:, None]
    exponents = log_mass + t * start + np.logaddexp(log_lower, log_upper + t * width)
    peak = exponents.max(axis=1, keepdims=True)
    # The small relative allowance covers the rounding of the centroids and sums.
    return (peak + np.log(np.exp(exponents - peak).sum(axis=1, keepdims=True)))[:, 0] + 1e-9


def _log_mgf_curve(singles: Sequence[tuple[DiscretePld, int]], t: np.ndarray) -> np.ndarray:
    """Upper bound on the composed log-MGF log E[e^(t S)] of the finite part, for each t."""
    return sum(count * _log_mgf_bound(pld, t) for pld, count in singles)


@lru_cache(maxsize=8)
def _chernoff_curves(singles: tuple[tuple[DiscretePld, int], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The composed log-MGF bound at _CHERNOFF_T, at -_CHERNOFF_T and at _TILTS (read-only)."""
    curves = tuple(_log_mgf_curve(singles, t) for t in (_CHERNOFF_T, -_CHERNOFF_T, _TILTS))
    for curve in curves:
        curve.setflags(write=False)
    return curves


def _chernoff_tilt_for_delta(curve: np.ndarray, delta: float) -> tuple[float, float, float]:
    """(tilt, estimated epsilon, log delta) where the Chernoff bound (K(l) - log delta) / l is least."""
    bounds = (curve - math.log(delta)) / _TILTS
    best = int(np.argmin(bounds))
    return float(_TILTS[best]), float(bounds[best]), math.log(delta)


def _chernoff_tilt_for_epsilon(curve: np.ndarray, epsilon: float) -> tuple[float, float, float]:
    """(tilt, epsilon, estimated log delta) where the Chernoff bound exp(K(l) - l eps) is least."""
    exponent = _TILTS * epsilon - curve
    best = int(np.argmax(exponent))
    if exponent[best] <= 0:
        return 0.0, epsilon, 0.0
    return float(_TILTS[best]), epsilon, float(-exponent[best])


def _sufficient_tilts(singles: Sequence[tuple[DiscretePld, int]], interval: float, curve: np.ndarray,
                      target: tuple[float, float, float], share: float) -> np.ndarray:
    """Whether 0 and each of _TILTS leaves a negligible round-off floor at ``target``.

    The round-off share of delta is estimated as E e^(K(l) - l eps) / sqrt(1 - e^(-2 l h)) (E as
    in _roundoff_bound at the largest grid; the L2 norm of the untilting weights above eps); a
    smaller tilt spreads the tilted composition less, so it needs a narrower window. This choice
    affects tightness and speed, never validity.
    """
    _, epsilon, log_delta = target
    steps = sum(count for _, count in singles)
    norm = max(float(np.sqrt(np.sum(pld.masses**2))) for pld, _ in singles)
    stages = math.log2(MAX_GRID_POINTS)
    log_floor = math.log(math.sqrt(2.0) * steps * (stages * _FFT_STAGE_ERROR * norm + _POWER_ERROR))
    allowed = log_delta + math.log(share)
    with np.errstate(over="ignore"):
        floors = log_floor + curve - _TILTS * epsilon - 0.5 * np.log(-np.expm1(-2.0 * _TILTS * interval))
    return np.concatenate(([log_floor + 0.5 * math.log(MAX_GRID_POINTS) <= allowed], floors <= allowed))


def _roundoff_bound(size: int, inputs: Sequence[tuple[float, int]]) -> float:
    """Bound on the L2 norm of the bin errors of a normalised composition (module docstring).

    ``inputs`` holds (L2 norm of the wrapped, tilted, normalised single-step masses, steps) per
    group. Normwise: |dX|_2 <= s sqrt(N) |x|_2 for the forward FFT (s = stage error times
    stages); since |X| <= 1, the T-th power multiplies each coefficient's error by at most
    T e^(T max|dX|) and adds at most _POWER_ERROR T; the 1/N inverse maps a half-spectrum error
    of norm r to bin errors of norm at most sqrt(2) r / sqrt(N) (Parseval, the factor 2 for the
    conjugate half); and the inverse itself errs by at most s times the output's L2 norm, which
    is at most its sum 1 plus that error.
    """
    stage_error = math.ceil(math.log2(size)) * _FFT_STAGE_ERROR
    steps = sum(count for _, count in inputs)
    growth = steps * stage_error * math.sqrt(size) * max(norm for norm, _ in inputs)
    if growth > _MAX_ERROR_GROWTH:
        raise PrivacyError(f"the PLD of {steps} steps on {size} grid points is beyond the certified floating-point "
                           "range; use accountant='rdp' for this run")
    spectral = math.sqrt(2.0) * math.exp(growth) * sum(
        count * (stage_error * norm + _POWER_ERROR) for norm, count in inputs)
    return spectral + stage_error * (1.0 + spectral)


@dataclass(frozen=True)
class _Window:
    first: int
    size: int
    overflow: float  # Chernoff bound on mass above the window (lost: counted as infinite loss)
    underflow: float  # Chernoff bound on mass below it (counted as infinite loss if first > 0)


@lru_cache(maxsize=16)  # small: entries keep single steps alive
def _window(singles: tuple[tuple[DiscretePld, int], ...], interval: float, tilt: float) -> _Window:
    t = _CHERNOFF_T
    up, down, _ = _chernoff_curves(singles)
    log_tail = math.log(_WINDOW_TAIL)
    # Chernoff: mass(S >= a) <= exp(K(t) - t a) and mass(S <= a) <= exp(K(-t) + t a).
    high = float(np.min((up - log_tail) / t))
    low = float(np.max((log_tail - down) / t))
    if tilt > 0:
        # Loss s above the window wraps onto s - W and untilts there as p(s) e^(tilt W): spurious
        # mass (an overstatement, so still an upper bound, but a loose one). Landing at or below
        # zero loss it never counts for epsilon >= 0; what lands above zero (s >= W, or every s
        # when low > 0) is at most exp(K(tilt + t) - t W - tilt min(low, 0)): keep it negligible.
        reach = np.min((_log_mgf_curve(singles, tilt + t) - tilt * max(low, 0.0) - log_tail) / t)
        high = max(high, min(low, 0.0) + float(reach))
    support_low = sum(count * pld.offset for pld, count in singles)
    support_high = sum(count * (pld.offset + pld.masses.size - 1) for pld, count in singles)
    first = max(support_low, math.floor(low / interval))
    last = min(support_high, math.ceil(high / interval))
    size = fft.next_fast_len(last - first + 1, real=True)
    if size > MAX_GRID_POINTS:
        raise PrivacyError(f"the composed PLD would need {size} grid points; use accountant='rdp' for this run")
    overflow = underflow = 0.0
    if first + size - 1 < support_high:
        overflow = float(np.exp(np.min(up - t * (first + size) * interval)))
    if first > support_low:
        underflow = float(np.exp(np.min(down + t * (first - 1) * interval)))
    return _Window(first=first, size=size, overflow=overflow, underflow=underflow)


def _fitting_tilt(singles: tuple[tuple[DiscretePld, int], ...], interval: float, tilt: float) -> float:
    """``tilt``, or else the largest smaller grid tilt (or 0) whose window is affordable.

    The tilted loss can spread far in heavy-tailed settings (tiny sample rates and noise); a
    smaller tilt is less precise in the far tail but just as valid, and much cheaper. A tilt
    may widen the window up to _TILTED_POINTS, or up to the untilted window if that is wider.
    """
    affordable = max(_TILTED_POINTS, _window(singles, interval, 0.0).size)
    for candidate in (tilt, *_TILTS[_TILTS < tilt][::-1]):
        try:
            if _window(singles, interval, float(candidate)).size <= affordable:
                return float(candidate)
        except PrivacyError:
            continue
    return 0.0


def _compose_direction(singles: tuple[tuple[DiscretePld, int], ...], interval: float, tilt: float) -> DiscretePld:
    """Compose at ``tilt``; the result's delta (masses plus round-off charge) is a certified bound."""
    if len(singles) == 1 and singles[0][1] == 1:
        return singles[0][0]  # one step: nothing to compose, and no round-off to allow for
    window = _window(singles, interval, tilt)
    size = window.size
    spectrum = np.ones(size // 2 + 1, dtype=np.complex128)
    log_scale = log_finite = input_error = 0.0
    norms = []
    for pld, count in singles:
        with np.errstate(divide="ignore"):
            log_tilted = np.log(pld.masses) + tilt * pld.losses
        shift = float(special.logsumexp(log_tilted))
        index = (pld.offset + np.arange(pld.masses.size)) % size
        wrapped = np.bincount(index, weights=np.exp(log_tilted - shift), minlength=size)
        norms.append((float(np.sqrt(np.sum(wrapped * wrapped))) * (1 + 1e-12), count))
        spectrum *= fft.rfft(wrapped) ** count
        log_scale += count * shift
        log_finite += count * math.log1p(-pld.infinity_mass)
        # Relative rounding of each tilted input: a few u per unit of its log-domain arguments.
        arguments = float(np.max(np.abs(log_tilted[np.isfinite(log_tilted)]))) + abs(shift) + 1.0
        input_error += count * 8.0 * UNIT_ROUNDOFF * arguments
    error = _roundoff_bound(size, norms)
    composed = np.roll(fft.irfft(spectrum, n=size), -(window.first % size))
    losses = (window.first + np.arange(size)) * interval
    # Untilt, with a relative margin for the inputs' rounding (their errors compound over the
    # steps) and for forming log_scale - tilt * l; the FFT's errors, of L2 norm at most
    # ``error``, are charged by DiscretePld.delta.
    scale_log = log_scale + 2.0 * input_error + 8.0 * UNIT_ROUNDOFF * (abs(log_scale) + 4.0)
    tilted = tilt * losses
    with np.errstate(divide="ignore"):
        log_masses = np.log(np.maximum(composed, 0.0)) + scale_log - tilted + 8.0 * UNIT_ROUNDOFF * np.abs(tilted)
    masses = np.exp(np.minimum(log_masses, 0.0))  # no bin holds more than the whole mass
    lost = window.overflow + (window.underflow if window.first > 0 else 0.0)
    infinity_mass = min(1.0, -math.expm1(log_finite) + lost)
    return DiscretePld(offset=window.first, masses=masses, infinity_mass=infinity_mass, interval=interval,
                       error_norm=error, scale_log=scale_log, tilt=tilt)


@dataclass(frozen=True, kw_only=True, eq=False)
class ComposedPld:
    """The composed loss in both directions; epsilon and delta are the worse of the two.

    Each query composes every direction at the tilt that suits it (see the module docstring);
    compositions are cached by tilt, and the tilts come from a fixed grid, so nearby queries
    share them.
    """

    singles: tuple[tuple[tuple[DiscretePld, int], ...], ...]  # per direction: (single step, count)
    interval: float
    _cache: dict[tuple[int, float], DiscretePld] = field(default_factory=dict, repr=False)

    def _compose(self, index: int, tilt: float) -> DiscretePld:
        tilt = _fitting_tilt(self.singles[index], self.interval, tilt)
        if (index, tilt) not in self._cache:
            if len(self._cache) >= _CACHED_COMPOSITIONS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(index, tilt)] = _compose_direction(self.singles[index], self.interval, tilt)
        return self._cache[(index, tilt)]

    def _pick(self, index: int, target: tuple[float, float, float]) -> DiscretePld:
        singles = self.singles[index]
        curve = _chernoff_curves(singles)[2]
        sufficient = _sufficient_tilts(singles, self.interval, curve, target, _FLOOR_SHARE)
        tilts = np.concatenate(([0.0], _TILTS))
        # Every composition is a valid bound: reuse any cached one that should be precise enough.
        for (i, tilt), pld in self._cache.items():
            if i == index and sufficient[int(np.searchsorted(tilts, tilt))]:
                return pld
        # Otherwise the least tilt up to the Chernoff one (less spread, less work) that should
        # also do for much smaller deltas, so that later queries can reuse it.
        ahead = _sufficient_tilts(singles, self.interval, curve, target, _FLOOR_SHARE * _REUSE_MARGIN)
        fine = np.flatnonzero(ahead & (tilts <= target[0]))
        return self._compose(index, float(tilts[fine[0]]) if fine.size else target[0])

    def _sharpest(self, index: int, epsilon: float) -> DiscretePld:
        """Composed at the tilt with the least estimated round-off share of delta(epsilon)."""
        curve = _chernoff_curves(self.singles[index])[2]
        with np.errstate(over="ignore"):
            floors = curve - _TILTS * epsilon - 0.5 * np.log(-np.expm1(-2.0 * _TILTS * self.interval))
        return self._compose(index, float(_TILTS[int(np.argmin(floors))]))

    def _cached(self, index: int) -> list[DiscretePld]:
        return [pld for (i, _), pld in self._cache.items() if i == index]

    def _direction_delta(self, index: int, epsilon: float) -> float:
        curve = _chernoff_curves(self.singles[index])[2]
        pld = self._pick(index, _chernoff_tilt_for_epsilon(curve, epsilon))
        if pld.roundoff_delta(epsilon) > _RETRY_SHARE * pld.delta(epsilon):  # the estimate misjudged
            self._sharpest(index, epsilon)
        # Every composition is a valid bound, so the least of them is too (and this keeps delta
        # and epsilon consistent with each other across queries).
        return min(cached.delta(epsilon) for cached in self._cached(index))

    def _direction_epsilon(self, index: int, delta: float) -> float:
        curve = _chernoff_curves(self.singles[index])[2]
        pld = self._pick(index, _chernoff_tilt_for_delta(curve, delta))
        epsilon = pld.epsilon(delta)
        if pld.roundoff_delta(epsilon) > _RETRY_SHARE * delta:  # the estimate misjudged
            self._sharpest(index, epsilon)
        return min(cached.epsilon(delta) for cached in self._cached(index))

    def delta(self, epsilon: float) -> float:
        if math.isinf(epsilon):
            return 0.0
        return max(self._direction_delta(index, epsilon) for index in range(len(self.singles)))

    def epsilon(self, delta: float) -> float:
        return max(self._direction_epsilon(index, delta) for index in range(len(self.singles)))


def compose_sampled_gaussians(groups: Sequence[tuple[float, float, int]]) -> ComposedPld:
    """Compose ``count`` steps of each (sample_rate, noise_multiplier, count) group."""
    merged: dict[tuple[float, float], int] = {}
    for q, sigma, count in groups:
        merged[(float(q), float(sigma))] = merged.get((float(q), float(sigma)), 0) + int(count)
    if not merged:
        empty = DiscretePld(offset=0, masses=np.ones(1), infinity_mass=0.0, interval=1.0)
        return ComposedPld(singles=(((empty, 1),),), interval=1.0)
    cleaned = [(q, sigma, count) for (q, sigma), count in sorted(merged.items())]
    interval = grid_interval(cleaned)
    # With q = 1 both directions are the same Gaussian pair, so one suffices.
    directions = [Direction.REMOVE] if all(q == 1.0 for q, _, _ in cleaned) else list(Direction)
    return ComposedPld(interval=interval, singles=tuple(
        tuple((single_step(d, q, sigma, interval), count) for q, sigma, count in cleaned) for d in directions))
