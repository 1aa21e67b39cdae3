"""One step of the Poisson-subsampled Gaussian as a discrete privacy loss distribution.

The privacy loss L = log(dP/dQ), drawn under P, of one step in either direction (see
:mod:`securefed.privacy.pld`) is placed on a grid of spacing h, with a mass at infinite loss for
what the grid cannot hold; :class:`DiscretePld` holds such a distribution (one step, or the
composition of many) and answers delta(epsilon) and epsilon(delta).

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

import numpy as np
from scipy import special

from ..errors import PrivacyError

__all__ = ["Direction", "DiscretePld", "single_step", "grid_interval", "UNIT_ROUNDOFF", "MAX_GRID_POINTS"]

# Grid points per standard deviation of the single-step loss: at 100, the spread's variance
# inflation (h^2/6 per step) is under 2e-5 of the loss variance, far inside a 1% epsilon budget.
_POINTS_PER_STD = 100
_MAX_INTERVAL = 0.01
# Single-step loss tails left outside the grid, in probability (below: rounded up; above: kept
# at the top point or sent to infinity, so these only cost tightness, never validity).
_SINGLE_STEP_TAIL = 1e-20
# Grids (single-step or composed) are refused beyond this many points.
MAX_GRID_POINTS = 1 << 24
# A single step's grid is coarsened rather than grown past this (heavy tails at tiny q and noise).
_MAX_SINGLE_STEP_POINTS = 1 << 22
UNIT_ROUNDOFF = 2.0**-53


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
    # Round-off of a composition (see securefed.privacy.pld): the errors of the tilted,
    # normalised masses have L2 norm at most error_norm, and untilting scales the one at loss
    # l by at most exp(scale_log - tilt l + 8u |tilt l|). delta adds their worst effect.
    error_norm: float = 0.0
    scale_log: float = 0.0
    tilt: float = 0.0
    _epsilons: dict[float, float] = field(default_factory=dict, repr=False)  # epsilon(delta), memoised
    _deltas: dict[float, float] = field(default_factory=dict, repr=False)  # delta(epsilon), memoised

    @property
    def losses(self) -> np.ndarray:
        return (self.offset + np.arange(self.masses.size)) * self.interval

    def _above(self, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
        """(losses, masses) of the points with loss > epsilon (only those are formed)."""
        first = min(max(0, math.floor(epsilon / self.interval) - self.offset - 1), self.masses.size)
        losses = (self.offset + np.arange(first, self.masses.size)) * self.interval
        keep = losses > epsilon
        return losses[keep], self.masses[first:][keep]

    def _error_weights(self, losses: np.ndarray, epsilon: float) -> np.ndarray:
        tilted = self.tilt * losses
        with np.errstate(over="ignore"):
            return np.exp(self.scale_log - tilted + 8.0 * UNIT_ROUNDOFF * np.abs(tilted)) * -np.expm1(epsilon - losses)

    def roundoff_delta(self, epsilon: float) -> float:
        """The round-off allowance in delta(epsilon).

        The mass errors e_l enter delta as sum over l > eps of e_l w_l (1 - e^(eps - l)), which
        by Cauchy-Schwarz is at most error_norm times the L2 norm of w (1 - e^(eps - l)).
        """
        if self.error_norm == 0 or math.isinf(epsilon):
            return 0.0
        weights = self._error_weights(self._above(epsilon)[0], epsilon)
        with np.errstate(over="ignore"):
            norm = float(np.sqrt(np.sum(weights * weights)))
        return self.error_norm * norm * (1.0 + _sum_slack(weights.size))

    def delta(self, epsilon: float) -> float:
        """delta(eps) = p_inf + sum over l > eps of p(l) (1 - e^(eps - l)), plus the round-off allowance."""
        if math.isinf(epsilon):
            return 0.0
        if epsilon not in self._deltas:
            losses, masses = self._above(epsilon)
            terms = masses * -np.expm1(epsilon - losses)
            # Rounded upward: a float sum of n non-negative terms errs by at most about n u of it.
            value = self.infinity_mass + float(np.sum(terms)) * (1.0 + _sum_slack(terms.size))
            self._deltas[epsilon] = min(1.0, value + self.roundoff_delta(epsilon))
        return self._deltas[epsilon]

    def epsilon(self, delta: float) -> float:
        """The smallest eps >= 0 with delta(eps) <= delta (math.inf if none), up to float rounding.

        Suffix sums bracket the grid interval (l_(j-1), l_j] that holds it, bisection with exact
        evaluations finds it, and the answer there is solved from sums over the points >= j and
        checked with :meth:`delta` itself, so the value returned always satisfies
        delta(eps) <= delta.
        """
        if delta not in self._epsilons:
            self._epsilons[delta] = self._epsilon(delta)
        return self._epsilons[delta]

    def _epsilon(self, delta: float) -> float:
        if self.infinity_mass >= delta:
            return math.inf
        if self.delta(0.0) <= delta:
            return 0.0
        losses = self.losses
        grid = losses[int(np.searchsorted(losses, 0.0, side="right")):]  # losses > 0
        # delta(l_j) lies between the mass part alone and the mass part plus the round-off term
        # without its (1 - e^(l_j - l)) factor; bisect with exact evaluations between the two.
        low, high = self._grid_bracket(grid, delta)
        while self.delta(float(grid[high])) > delta:  # the bracket was off (rounding): widen it
            low, high = high + 1, min(2 * high + 1, grid.size - 1)  # the top point always passes
        while low < high:
            middle = (low + high) // 2
            if self.delta(float(grid[middle])) <= delta:
                high = middle
            else:
                low = middle + 1
        solved = self._solve_between(grid, high, delta)
        return solved if self.delta(solved) <= delta else float(grid[high])

    def _grid_bracket(self, grid: np.ndarray, delta: float) -> tuple[int, int]:
        """Indices between which the first grid point l_j with delta(l_j) <= delta should lie.

        Estimated from suffix sums: e^(l_j) sum p(l) e^-l by way of e^-(l - l_0) (no overflow,
        harmless underflow), and the round-off term's sum of w^2 (1 - e^(l_j - l))^2 in closed
        form (w is exponential in l, so the sums are geometric); cancellation in either only
        blurs the bracket, which :meth:`epsilon` checks exactly.
        """
        masses = self.masses[self.masses.size - grid.size:]

        def above(values: np.ndarray) -> np.ndarray:  # sums over the points above each l_j
            return np.append(np.cumsum(values[::-1])[::-1][1:], 0.0)

        shift = np.exp(np.minimum(grid - grid[0], 700.0))
        estimate = self.infinity_mass + above(masses) - shift * above(masses * np.exp(grid[0] - grid))
        if self.error_norm:
            h, count = self.interval, np.arange(grid.size - 1, -1, -1, dtype=np.float64)  # points above

            def geometric(rate: float) -> np.ndarray:  # sum of e^(-rate m) for m < count
                return count if rate == 0 else np.expm1(-rate * count) / math.expm1(-rate)

            rate = 2.0 * self.tilt * h
            spread = (geometric(rate) - 2.0 * math.exp(-h) * geometric(rate + h)
                      + math.exp(-2.0 * h) * geometric(rate + 2.0 * h))
            with np.errstate(over="ignore"):
                first_weight = np.exp(2.0 * (self.scale_log - self.tilt * (grid + h)))
            estimate = estimate + self.error_norm * np.sqrt(first_weight * np.maximum(spread, 0.0))
        first_upper = np.flatnonzero(estimate * (1.0 + 1e-3) <= delta)
        high = int(first_upper[0]) if first_upper.size else grid.size - 1
        first_lower = np.flatnonzero(estimate[: high + 1] * (1.0 - 1e-3) <= delta)
        return (int(first_lower[0]) if first_lower.size else high), high

    def _solve_between(self, grid: np.ndarray, j: int, delta: float) -> float:
        """Bisect for the least eps in (l_(j-1), l_j] where delta, summed over points >= j, is <= delta."""
        losses = grid[j:]
        masses = self.masses[self.masses.size - grid.size + j:]
        relative = np.exp(grid[j] - losses)  # e^-(l - l_j)
        slack = 1.0 + _sum_slack(losses.size)
        mass, weighted = float(np.sum(masses)) * slack, float(np.sum(masses * relative)) / slack
        squares = self._error_weights(losses, -math.inf) ** 2 if self.error_norm else np.zeros(1)
        c0, c1, c2 = (float(np.sum(squares * relative**k)) for k in (0, 1, 2))

        def value(eps: float) -> float:
            r = math.exp(eps - grid[j])
            spread = max(c0 - 2 * r * c1 + r * r * c2, 0.0)
            return self.infinity_mass + mass - r * weighted + self.error_norm * math.sqrt(spread) * slack

        low, high = (float(grid[j - 1]) if j > 0 else 0.0), float(grid[j])
        for _ in range(60):
            middle = 0.5 * (low + high)
            if value(middle) <= delta:
                high = middle
            else:
                low = middle
        return high


def _sum_slack(terms: int) -> float:
    """Relative error bound of a float64 sum of ``terms`` non-negative numbers (Higham 2002)."""
    return 2.0 * (terms + 1) * UNIT_ROUNDOFF


def _mixture_to_normal_x(loss: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """Inverse of the remove-direction loss L(x) = log(1 - q + q exp((2x - 1) / (2 s^2)))."""
    if q == 1.0:
        return sigma**2 * loss + 0.5
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
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
    if last - first > MAX_GRID_POINTS:
        raise PrivacyError(f"the PLD grid for sample_rate={q}, noise_multiplier={sigma} would need {last - first} "
                           "points; use accountant='rdp' for such extreme parameters")
    grid = np.arange(first, last + 1) * interval
    cdf_p, sf_p, cdf_q, sf_q = _distribution_functions(direction, grid, q, sigma)
    cell_p, cell_q = _interval_masses(cdf_p, sf_p), _interval_masses(cdf_q, sf_q)
    # Split cell i between l_i and l_(i+1) preserving P-mass and Q-mass (see module docstring).
    # e^l * Q-mass is formed in log space: at tiny noise e^l alone overflows.
    with np.errstate(divide="ignore", over="ignore"):
        q_at_lower = np.exp(grid[:-1] + np.log(cell_q))
        q_at_top = float(np.exp(grid[-1] + np.log(sf_q[-1])))
    upper_share = np.clip((cell_p - q_at_lower) / -math.expm1(-interval), 0.0, cell_p)
    masses = np.zeros(grid.size)
    masses[:-1] += cell_p - upper_share
    masses[1:] += upper_share
    masses[0] += cdf_p[0]  # loss below the grid, rounded up to its bottom
    # Above the grid: keep the part whose Q-mass fits at the top point; the rest is infinite loss.
    kept_at_top = min(float(sf_p[-1]), q_at_top)
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


def grid_interval(groups: Sequence[tuple[float, float, int]]) -> float:
    steps = sum(count for _, _, count in groups)
    mean_variance = sum(count * _loss_variance(q, sigma) for q, sigma, count in groups) / steps
    interval = min(_MAX_INTERVAL, math.sqrt(mean_variance) / _POINTS_PER_STD)
    # Where the loss has a long thin upper tail, a coarser grid stays valid, just less tight.
    widest = max(high - low for q, sigma, _ in groups for low, high in
                 (_loss_range(direction, q, sigma) for direction in Direction))
    return max(interval, widest / _MAX_SINGLE_STEP_POINTS)
