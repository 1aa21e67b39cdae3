"""Notebook helpers: the epsilon of a DP-SGD run, and the noise multiplier that reaches a target.

``epsilon`` is a one-call wrapper around the accountants for the common case (one Poisson-
subsampled Gaussian run). ``noise_multiplier_for`` inverts it. Epsilon decreases continuously in
the noise multiplier, and log(epsilon) is close to linear in log(noise multiplier), so we
bracket the answer by doubling/halving and then run the Illinois variant of regula falsi
(Dowell and Jarratt 1971) on that log-log curve, stopping as soon as epsilon lands in
[0.99 * target, target]: the caller gets at most the budget asked for, and wastes at most 1%.
The PLD search starts from the RDP answer, which is an upper bound on the noise PLD needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import ConfigError, PrivacyError
from .accounting import AccountantKind, _kind_problem, accountant_kind, compose_epsilon
from .events import PoissonSampledGaussian
from .._values import is_real

__all__ = ["MAX_TARGET_EPSILON", "MIN_NOISE_MULTIPLIER", "MAX_NOISE_MULTIPLIER", "epsilon", "noise_multiplier_for"]

# Above this a guarantee is meaningless: it lets likelihood ratios reach e^100.
MAX_TARGET_EPSILON = 100.0
# The search range: below 0.01 no run has useful privacy, above 1e4 the signal is lost in noise.
MIN_NOISE_MULTIPLIER = 1e-2
MAX_NOISE_MULTIPLIER = 1e4
# The returned noise multiplier gives an epsilon in [_BAND_LOW * target, target].
_BAND_LOW = 0.99
_AIM = 0.995
_MAX_ITERATIONS = 200



def _run_problems(*, delta: object, sample_rate: object, steps: object, accountant: object) -> list[str]:
    problems = []
    if not (is_real(delta) and 0 < delta < 1):
        problems.append(f"delta must be a number in (0, 1), typically below 1/(number of records), got {delta!r}")
    if not (is_real(sample_rate) and 0 < sample_rate <= 1):
        problems.append(f"sample_rate must be in (0, 1] (expected batch size / dataset size), got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        problems.append(f"steps must be an int >= 1 (number of noisy updates), got {steps!r}")
    kind_problem = _kind_problem(accountant)
    if kind_problem:
        problems.append(kind_problem)
    return problems


def _epsilon_unchecked(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                       kind: AccountantKind) -> float:
    event = PoissonSampledGaussian(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return compose_epsilon([event], delta=delta, accountant=kind)


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (DP-SGD)."""
    problems = _run_problems(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    if not (is_real(noise_multiplier) and noise_multiplier > 0):
        problems.insert(0, f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if problems:
        raise ConfigError(problems)
    return _epsilon_unchecked(float(noise_multiplier), float(sample_rate), steps, float(delta),
                              accountant_kind(accountant))


def _log(value: float) -> float:
    # Epsilon can be exactly 0 (delta above the total variation) or infinite.
    return math.log(value) if value > 0 else -math.inf


def _in_band(value: float, target: float) -> bool:
    return _BAND_LOW * target <= value <= target


def _solve(eps_of: Callable[[float], float], target: float, *, start: float, delta_hint: float) -> float:
    """A noise multiplier whose epsilon lies in the band, searching from ``start``."""
    z = min(max(start, MIN_NOISE_MULTIPLIER), MAX_NOISE_MULTIPLIER)
    value = eps_of(z)
    if _in_band(value, target):
        return z
    # Bracket: (low, eps > target) and (high, eps <= target).
    if value > target:
        low, low_eps = z, value
        high = z
        while True:
            if high >= MAX_NOISE_MULTIPLIER:
                raise PrivacyError(
                    f"epsilon {target:g} is out of reach: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} gives "
                    f"epsilon {low_eps:.4g}; allow a larger epsilon, fewer steps or a smaller sample rate")
            high = min(high * 2.0, MAX_NOISE_MULTIPLIER)
            high_eps = eps_of(high)
            if _in_band(high_eps, target):
                return high
            if high_eps <= target:
                break
            low, low_eps = high, high_eps
    else:
        high, high_eps = z, value
        low = z
        while True:
            if low <= MIN_NOISE_MULTIPLIER:
                raise PrivacyError(
                    f"epsilon {target:g} is looser than this run can spend: even noise_multiplier="
                    f"{MIN_NOISE_MULTIPLIER:g} gives only epsilon {high_eps:.4g}; ask for a smaller epsilon")
            low = max(low / 2.0, MIN_NOISE_MULTIPLIER)
            low_eps = eps_of(low)
            if _in_band(low_eps, target):
                return low
            if low_eps > target:
                break
            high, high_eps = low, low_eps
    # Illinois regula falsi on g(u) = log eps(e^u) - log(aim): g(low) > 0 >= g(high) roughly.
    aim = math.log(_AIM * target)
    u_low, u_high = math.log(low), math.log(high)
    g_low, g_high = _log(low_eps) - aim, _log(high_eps) - aim
    side = 0
    for _ in range(_MAX_ITERATIONS):
        if math.isfinite(g_low) and math.isfinite(g_high) and g_low != g_high:
            u = u_high - g_high * (u_high - u_low) / (g_high - g_low)
            if not min(u_low, u_high) < u < max(u_low, u_high):
                u = 0.5 * (u_low + u_high)
        else:  # epsilon was infinite at the low end: bisect
            u = 0.5 * (u_low + u_high)
        value = eps_of(math.exp(u))
        if _in_band(value, target):
            return math.exp(u)
        g = _log(value) - aim
        if value > target:
            u_low, g_low, low_eps = u, g, value
            if side == -1:
                g_high /= 2.0
            side = -1
        else:
            u_high, g_high, high_eps = u, g, value
            if side == 1:
                g_low /= 2.0
            side = 1
        if u_high - u_low < 1e-13:
            break
    band = f"[{_BAND_LOW * target:.6g}, {target:g}]"
    if high_eps == 0:
        # Genuine: once delta exceeds the mechanism's total variation distance, epsilon 0 holds.
        raise PrivacyError(
            f"no noise multiplier gives epsilon in {band}: epsilon drops from {low_eps:.6g} straight to 0 "
            f"near noise_multiplier={math.exp(u_high):.6g}, where delta={delta_hint} already covers the "
            f"whole difference between neighbours; use that noise (epsilon 0) or ask for a smaller delta")
    # The PLD's certified precision depends on discrete choices (grid, tilt, window), so at
    # extreme settings (tiny sample rates and deltas) its epsilon can step over the band.
    raise PrivacyError(
        f"could not find a noise multiplier with epsilon in {band}: epsilon jumps from {low_eps:.6g} to "
        f"{high_eps:.6g} near noise_multiplier={math.exp(u_high):.6g} (both are valid bounds; the accountant's "
        f"precision changes there); use that noise (epsilon {high_eps:.6g}), a target outside the jump, or "
        "accountant='rdp'")


def noise_multiplier_for(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The noise multiplier whose epsilon is within 1% below ``target_epsilon`` (never above)."""
    problems = _run_problems(delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
    if not (is_real(target_epsilon) and 0 < target_epsilon <= MAX_TARGET_EPSILON):
        problems.insert(0, f"target_epsilon must be a number in (0, {MAX_TARGET_EPSILON:g}], got {target_epsilon!r}"
                        + (f": above {MAX_TARGET_EPSILON:g} the guarantee is meaningless (it allows likelihood "
                           f"ratios of e^{MAX_TARGET_EPSILON:g}); typical targets are 1 to 10"
                           if is_real(target_epsilon) and target_epsilon > MAX_TARGET_EPSILON else ""))
    if problems:
        raise ConfigError(problems)
    target, rate, delta = float(target_epsilon), float(sample_rate), float(delta)

    def rdp_eps(z: float) -> float:
        return _epsilon_unchecked(z, rate, steps, delta, AccountantKind.RDP)

    if accountant_kind(accountant) is AccountantKind.RDP:
        return _solve(rdp_eps, target, start=1.0, delta_hint=delta)

    def pld_eps(z: float) -> float:
        return _epsilon_unchecked(z, rate, steps, delta, AccountantKind.PLD)

    # PLD is tighter, so it needs at most the RDP noise; start just below it (or from 1 where
    # no RDP answer exists: the PLD's epsilon may still reach the band).
    try:
        start = _solve(rdp_eps, target, start=1.0, delta_hint=delta) * 0.95
    except PrivacyError:
        start = 1.0
    return _solve(pld_eps, target, start=start, delta_hint=delta)
