"""Privacy loss distribution (PLD) accounting for the Poisson-subsampled Gaussian.

For a pair of output distributions (P, Q) the privacy loss L = log(dP/dQ), drawn under P, has
the hockey-stick divergence delta(eps) = E_P[(1 - e^(eps - L))_+] (+ P's mass where Q is zero);
composing mechanisms adds independent losses, so the loss distributions convolve (Meiser and
Mohammadi 2018, "Tight on Budget?"; Koskela, Jalko and Honkela 2020, "Computing Tight
Differential Privacy Guarantees Using FFT"). Under add/remove adjacency the subsampled Gaussian
has two directions, remove (P = (1-q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2)) and add (the two
swapped); like dp-accounting we compose each direction separately and report the worse one.

Discretisation is "connect the dots" (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022, "Connect
the Dots: Tighter Discrete Approximations of Privacy Loss Distributions"): the loss is placed on
the grid l_i = i * h, and the true loss mass in each cell [l_i, l_(i+1)] is split between the
two ends so that both its P-mass and its Q-mass (P-mass times e^-L) are preserved. Since delta is
convex in e^eps, this spread can only raise delta, for the mechanism and for every composition,
so the result is an upper bound; unlike rounding every loss up, its bias is second order in h
(it inflates the loss variance by about h^2/6 per step) instead of h/2 per step. Loss below the
grid is rounded up to its bottom; above the grid, what cannot be kept at the top point goes to
an explicit infinite-loss mass. The grid spacing h is a fixed fraction of the per-step loss
standard deviation, which keeps the relative error of the composed distribution small at any
step count (coarsened only when a very long loss tail would need millions of points).

Composition is one FFT power per (sample rate, noise) group: all groups are wrapped onto a
common circular window that a Chernoff bound (computed from the discretised distribution's
exact moment generating function) shows holds all but a tiny mass of the composed loss. Mass
above the window would wrap around to low losses, so its Chernoff bound is added to the
infinite-loss mass; mass below the window wraps to high losses, which only overstates delta.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np
from scipy import fft, special

from ..errors import PrivacyError

__all__ = ["Direction", "DiscretePld", "ComposedPld", "compose_sampled_gaussians"]

# Grid points per standard deviation of the single-step loss: at 100, the spread's variance
# inflation (h^2/6 per step) is under 2e-5 of the loss variance, far inside a 1% epsilon budget.
_POINTS_PER_STD = 100
_MAX_INTERVAL = 0.01
# Single-step loss tails left outside the grid, in probability (below: rounded up; above: kept
# at the top point or sent to infinity, so these only cost tightness, never validity).
_SINGLE_STEP_TAIL = 1e-20
# Mass of the composed loss allowed outside the circular window (bounded by Chernoff).
_WINDOW_TAIL = 1e-20
_CHERNOFF_T = np.geomspace(1e-3, 1e3, 49)
_MGF_BLOCKS = 4096
_MAX_FFT_POINTS = 1 << 24
# A single step's grid is coarsened rather than grown past this (heavy tails at tiny q and noise).
_MAX_SINGLE_STEP_POINTS = 1 << 22


class Direction(Enum):
    """Which neighbour is the one with the extra record."""

    REMOVE = "remove"  # P = mixture, Q = N(0, s^2)
    ADD = "add"  # P = N(0, s^2), Q = mixture


@dataclass(frozen=True, kw_only=True, eq=False)
class DiscretePld:
    """P-masses at losses (offset + i) * interval, plus a mass at infinite loss."""

    offset: int
    masses: np.ndarray
    infinity_mass: float
    interval: float

    @property
    def losses(self) -> np.ndarray:
        return (self.offset + np.arange(self.masses.size)) * self.interval

    def delta(self, epsilon: float) -> float:
        """delta(eps) = p_inf + sum over l > eps of p(l) (1 - e^(eps - l))."""
        if math.isinf(epsilon):
            return 0.0
        losses = self.losses
        above = losses > epsilon
        value = self.infinity_mass + float(np.sum(self.masses[above] * -np.expm1(epsilon - losses[above])))
        return min(1.0, value)

    def epsilon(self, delta: float) -> float:
        """The smallest eps >= 0 with delta(eps) <= delta (math.inf if none)."""
        if self.infinity_mass >= delta:
            return math.inf
        if self.delta(0.0) <= delta:
            return 0.0
        losses = self.losses
        start = int(np.searchsorted(losses, 0.0, side="right"))  # first loss > 0
        masses, grid = self.masses[start:], losses[start:]
        # Suffix sums from the top: mass above each point and log of sum of p(l) e^-l above it.
        mass_from = np.cumsum(masses[::-1])[::-1]
        with np.errstate(divide="ignore"):
            log_weighted_from = np.logaddexp.accumulate((np.log(masses) - grid)[::-1])[::-1]
        # delta at grid point j counts only the points strictly above it.
        mass_above = np.append(mass_from[1:], 0.0)
        log_weighted_above = np.append(log_weighted_from[1:], -np.inf)
        delta_at_grid = self.infinity_mass + mass_above - np.exp(grid + log_weighted_above)
        j = int(np.argmax(delta_at_grid <= delta))
        # On (l_(j-1), l_j], delta(eps) = p_inf + A - e^eps B with A, B summed over points >= j.
        lower = grid[j - 1] if j > 0 else 0.0
        solved = math.log(self.infinity_mass + mass_from[j] - delta) - log_weighted_from[j]
        return float(min(max(solved, lower), grid[j]))


def _mixture_to_normal_x(loss: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """Inverse of the remove-direction loss L(x) = log(1 - q + q exp((2x - 1) / (2 s^2)))."""
    if q == 1.0:
        return sigma**2 * loss + 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.expm1(loss) + q
        x = sigma**2 * (np.log(inner) - math.log(q)) + 0.5
    return np.where(inner > 0, x, -np.inf)


def _remove_loss(x: float, q: float, sigma: float) -> float:
    exponent = (2.0 * x - 1.0) / (2.0 * sigma**2)
    if q == 1.0:
        return exponent
    return float(np.logaddexp(math.log1p(-q), math.log(q) + exponent))


def _distribution_functions(direction: Direction, loss: np.ndarray, q: float, sigma: float):
    """(cdf_P, sf_P, cdf_Q, sf_Q) of the loss at each point, each from its accurate side."""
    flip = direction is Direction.ADD
    x = _mixture_to_normal_x(-loss if flip else loss, q, sigma)
    below0, above0 = special.ndtr(x / sigma), special.ndtr(-x / sigma)
    below1, above1 = special.ndtr((x - 1.0) / sigma), special.ndtr((1.0 - x) / sigma)
    mix_below, mix_above = (1.0 - q) * below0 + q * below1, (1.0 - q) * above0 + q * above1
    if flip:  # the add-direction loss decreases in x, so its cdf is an upper tail in x
        return above0, below0, mix_above, mix_below
    return mix_below, mix_above, below0, above0


def _interval_masses(cdf: np.ndarray, sf: np.ndarray) -> np.ndarray:
    from_cdf, from_sf = np.diff(cdf), -np.diff(sf)
    return np.maximum(np.where(cdf[1:] < 0.5, from_cdf, from_sf), 0.0)


def _loss_range(direction: Direction, q: float, sigma: float) -> tuple[float, float]:
    """Loss values outside which P has at most _SINGLE_STEP_TAIL mass on each side."""
    reach = -sigma * float(special.ndtri(_SINGLE_STEP_TAIL))
    if direction is Direction.REMOVE:
        return _remove_loss(-reach, q, sigma), _remove_loss(1.0 + reach, q, sigma)
    return -_remove_loss(reach, q, sigma), -_remove_loss(-reach, q, sigma)


# Small: each entry holds up to a few MB of masses.
@lru_cache(maxsize=8)
def single_step(direction: Direction, q: float, sigma: float, interval: float) -> DiscretePld:
    """Connect-the-dots discretisation of one step of the subsampled Gaussian."""
    low, high = _loss_range(direction, q, sigma)
    first, last = math.floor(low / interval), math.ceil(high / interval)
    if last - first > _MAX_FFT_POINTS:
        raise PrivacyError(f"the PLD grid for sample_rate={q}, noise_multiplier={sigma} would need {last - first} "
                           "points; use accountant='rdp' for such extreme parameters")
    grid = np.arange(first, last + 1) * interval
    cdf_p, sf_p, cdf_q, sf_q = _distribution_functions(direction, grid, q, sigma)
    cell_p, cell_q = _interval_masses(cdf_p, sf_p), _interval_masses(cdf_q, sf_q)
    # Split cell i between l_i and l_(i+1) preserving P-mass and Q-mass (see module docstring).
    upper_share = (cell_p - np.exp(grid[:-1]) * cell_q) / -math.expm1(-interval)
    upper_share = np.clip(upper_share, 0.0, cell_p)
    masses = np.zeros(grid.size)
    masses[:-1] += cell_p - upper_share
    masses[1:] += upper_share
    masses[0] += cdf_p[0]  # loss below the grid, rounded up to its bottom
    # Above the grid: keep the part whose Q-mass fits at the top point; the rest is infinite loss.
    kept_at_top = min(sf_p[-1], math.exp(grid[-1]) * sf_q[-1])
    masses[-1] += kept_at_top
    masses.setflags(write=False)
    return DiscretePld(offset=first, masses=masses, infinity_mass=max(0.0, float(sf_p[-1] - kept_at_top)),
                       interval=interval)


@lru_cache(maxsize=256)
def _loss_variance(q: float, sigma: float) -> float:
    """Variance of the single-step remove-direction loss, by quadrature on a dense x grid."""
    if q == 1.0:
        return 1.0 / sigma**2
    x = np.linspace(-12.0 * sigma, 1.0 + 12.0 * sigma, 20001)
    exponent = (2.0 * x - 1.0) / (2.0 * sigma**2)
    loss = np.logaddexp(math.log1p(-q), math.log(q) + exponent)
    density = (1.0 - q) * np.exp(-0.5 * (x / sigma) ** 2) + q * np.exp(-0.5 * ((x - 1.0) / sigma) ** 2)
    density /= density.sum()
    mean = float(np.sum(density * loss))
    return float(np.sum(density * (loss - mean) ** 2))


def _log_mgf_bound(pld: DiscretePld, t: np.ndarray) -> np.ndarray:
    """Upper bound on log sum_l p(l) e^(t l) of the finite part, for each t (of one sign).

    The masses are pooled into at most _MGF_BLOCKS blocks, each placed at its end that makes
    e^(t l) largest, so the bound stays valid (Chernoff needs an upper bound) at a small cost.
    """
    block = max(1, -(-pld.masses.size // _MGF_BLOCKS))
    starts = np.arange(0, pld.masses.size, block)
    pooled = np.add.reduceat(pld.masses, starts)
    ends = np.minimum(starts + block - 1, pld.masses.size - 1) if t[0] > 0 else starts
    with np.errstate(divide="ignore"):
        exponents = np.log(pooled)[None, :] + t[:, None] * ((pld.offset + ends) * pld.interval)[None, :]
    peak = exponents.max(axis=1)
    return peak + np.log(np.exp(exponents - peak[:, None]).sum(axis=1))


@dataclass(frozen=True, kw_only=True, eq=False)
class ComposedPld:
    """The composed loss in both directions; epsilon and delta are the worse of the two."""

    directions: tuple[DiscretePld, ...]

    def delta(self, epsilon: float) -> float:
        return max(pld.delta(epsilon) for pld in self.directions)

    def epsilon(self, delta: float) -> float:
        return max(pld.epsilon(delta) for pld in self.directions)


def _interval_for(groups: Sequence[tuple[float, float, int]]) -> float:
    steps = sum(count for _, _, count in groups)
    mean_variance = sum(count * _loss_variance(q, sigma) for q, sigma, count in groups) / steps
    interval = min(_MAX_INTERVAL, math.sqrt(mean_variance) / _POINTS_PER_STD)
    # Where the loss has a long thin upper tail, a coarser grid stays valid, just less tight.
    widest = max(high - low for q, sigma, _ in groups for low, high in
                 (_loss_range(direction, q, sigma) for direction in Direction))
    return max(interval, widest / _MAX_SINGLE_STEP_POINTS)


def _compose_direction(singles: Sequence[tuple[DiscretePld, int]], interval: float) -> DiscretePld:
    t = _CHERNOFF_T
    up = sum(count * _log_mgf_bound(pld, t) for pld, count in singles)
    down = sum(count * _log_mgf_bound(pld, -t) for pld, count in singles)
    log_tail = math.log(_WINDOW_TAIL)
    # Chernoff: mass(S >= a) <= exp(K(t) - t a) and mass(S <= a) <= exp(K(-t) + t a).
    high = float(np.min((up - log_tail) / t))
    low = float(np.max((log_tail - down) / t))
    support_low = sum(count * pld.offset for pld, count in singles)
    support_high = sum(count * (pld.offset + pld.masses.size - 1) for pld, count in singles)
    first = max(support_low, math.floor(low / interval))
    last = min(support_high, math.ceil(high / interval))
    size = fft.next_fast_len(last - first + 1, real=True)
    if size > _MAX_FFT_POINTS:
        raise PrivacyError(f"the composed PLD would need {size} grid points; use accountant='rdp' for this run")
    # The window [first, first + size) covers the exact support whenever last == support_high.
    overflow = 0.0
    if first + size - 1 < support_high:
        overflow = float(np.exp(np.min(up - t * (first + size) * interval)))
    spectrum = np.ones(size // 2 + 1, dtype=np.complex128)
    log_finite = 0.0
    for pld, count in singles:
        index = (pld.offset + np.arange(pld.masses.size)) % size
        wrapped = np.bincount(index, weights=pld.masses, minlength=size)
        spectrum *= fft.rfft(wrapped) ** count
        log_finite += count * math.log1p(-pld.infinity_mass)
    composed = np.maximum(fft.irfft(spectrum, n=size), 0.0)
    masses = np.roll(composed, -(first % size))
    infinity_mass = min(1.0, -math.expm1(log_finite) + overflow)
    return DiscretePld(offset=first, masses=masses, infinity_mass=infinity_mass, interval=interval)


def compose_sampled_gaussians(groups: Sequence[tuple[float, float, int]]) -> ComposedPld:
    """Compose ``count`` steps of each (sample_rate, noise_multiplier, count) group."""
    merged: dict[tuple[float, float], int] = {}
    for q, sigma, count in groups:
        merged[(float(q), float(sigma))] = merged.get((float(q), float(sigma)), 0) + int(count)
    if not merged:
        return ComposedPld(directions=(DiscretePld(offset=0, masses=np.ones(1), infinity_mass=0.0, interval=1.0),))
    cleaned = [(q, sigma, count) for (q, sigma), count in sorted(merged.items())]
    interval = _interval_for(cleaned)
    # With q = 1 both directions are the same Gaussian pair, so one suffices.
    directions = [Direction.REMOVE] if all(q == 1.0 for q, _, _ in cleaned) else list(Direction)
    return ComposedPld(directions=tuple(
        _compose_direction([(single_step(d, q, sigma, interval), count) for q, sigma, count in cleaned], interval)
        for d in directions
    ))
