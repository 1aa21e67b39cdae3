"""Privacy events: immutable descriptions of mechanism executions that accountants consume.

An event says what ran, not what it cost: the cost depends on the accountant and on delta, and a
regulator re-deriving the cost from a ledger needs the parameters, not our arithmetic. Every event
round-trips through ``to_record`` / ``event_from_record`` (plain JSON types) so the ledger can
store it and a verifier can recompute epsilon from it.

Counts are capped (sites and cohort at ``MAX_SITES``, dimension at ``MAX_DIMENSION``, steps at
``MAX_STEPS``) far above any real federation, so an event decoded from an untrusted file cannot
make accounting run out of memory or time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = [
    "MechanismKind",
    "PrivacyUnit",
    "PoissonSampledGaussian",
    "DistributedDiscreteGaussian",
    "PrivacyEvent",
    "event_from_record",
    "MAX_SITES",
    "MAX_DIMENSION",
    "MAX_STEPS",
    "MAX_SAMPLER_TV",
]

MAX_SITES = 10**7
MAX_DIMENSION = 2**40
MAX_STEPS = 10**9
# A sampler further than this from the exact distribution, per coordinate, is not a discrete
# Gaussian sampler worth accounting for (the fast one is within about 1e-14).
MAX_SAMPLER_TV = 1e-6
# tau() sums this many terms exactly and bounds the rest (see DistributedDiscreteGaussian.tau).
_TAU_EXACT_TERMS = 10**5


class MechanismKind(Enum):
    POISSON_SAMPLED_GAUSSIAN = "poisson-sampled-gaussian"
    DISTRIBUTED_DISCRETE_GAUSSIAN = "distributed-discrete-gaussian"


class PrivacyUnit(Enum):
    """What one neighbouring change covers: one patient's record, or a whole site's data."""

    RECORD = "record"
    SITE = "site"


def _check_real(name: str, value: object, problems: list[str], *, low: float, high: float = math.inf,
                low_open: bool = True, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        problems.append(f"{name} must be a finite number, got {_short(value)}")
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        problems.append(f"{name} must lie in {left}{low:g}, {high:g}{right}, got {_short(value)}")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _short(value: object) -> str:
    # A decoded file may hold a number with thousands of digits, or deep nesting: never echo it all.
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an int of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_count(name: str, value: object, problems: list[str], *, minimum: int = 1,
                 maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        problems.append(f"{name} must be an int in [{minimum}, {maximum}], got {_short(value)}")


def _check_unit(value: object, problems: list[str]) -> None:
    if not isinstance(value, PrivacyUnit):
        problems.append(f"unit must be a PrivacyUnit, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PoissonSampledGaussian:
    """``steps`` compositions of a Gaussian mechanism on a Poisson sample of rate ``sample_rate``.

    DP-SGD is this with the per-example clip as sensitivity. A Gaussian mechanism without
    sampling (central site-level noise, or site sampling that gives no amplification) is
    ``sample_rate=1``. ``noise_multiplier`` is the noise standard deviation over the L2
    sensitivity.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    unit: PrivacyUnit = PrivacyUnit.RECORD

    kind = MechanismKind.POISSON_SAMPLED_GAUSSIAN

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_real("noise_multiplier", self.noise_multiplier, problems, low=0.0)
        _check_real("sample_rate", self.sample_rate, problems, low=0.0, high=1.0)
        _check_count("steps", self.steps, problems, maximum=MAX_STEPS)
        _check_unit(self.unit, problems)
        if problems:
            raise ConfigError(problems)

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            "unit": self.unit.value,
        }


@dataclass(frozen=True, kw_only=True)
class DistributedDiscreteGaussian:
    """A sum of ``sites`` integer vectors, each carrying its own discrete Gaussian noise.

    Kairouz, Liu and Steinke (2021): every site adds N_Z(0, site_sigma^2) per coordinate to its
    rotated, scaled, rounded update before secure aggregation, so the aggregate carries the noise
    of every site whose input made it into the sum. ``sites`` is the number of such sites (the
    survivors, or a lower bound on them); fewer sites means less noise and a larger epsilon.
    Sensitivities and sigma are in the integer domain (after scaling by 1/gamma).

    ``cohort``, if given, is the number of sites that started the round: an upper bound on the
    sites whose noise can be in the sum, fixed before the round so that a ledger can later
    accept a settle to more surviving sites without accepting an impossible number. It does not
    enter the privacy bound.

    The sensitivities must be consistent for integer vectors: ||x||_1 >= ||x||_2, and ||x||_1 <=
    min(||x||_2^2, sqrt(d) ||x||_2) is all that follows from the L2 bound, so ``l1_sensitivity``
    must be at least that (a smaller L1 claim would need a guarantee this event cannot show).

    ``sampler_tv`` is the total-variation distance of one site's noise sampler from the exact
    discrete Gaussian, per coordinate (0 for an exact sampler; see
    :func:`securefed.privacy.discrete_gaussian.fast_sampler_tv_bound`). The accountants charge
    H = sites * dimension * steps * sampler_tv: the mechanism is (eps, delta(eps) + (1 + e^eps) H)-DP.
    """

    l2_sensitivity: float
    l1_sensitivity: float
    site_sigma: float
    sites: int
    dimension: int
    steps: int = 1
    unit: PrivacyUnit = PrivacyUnit.SITE
    cohort: int | None = None
    sampler_tv: float = 0.0

    kind = MechanismKind.DISTRIBUTED_DISCRETE_GAUSSIAN

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_real("l2_sensitivity", self.l2_sensitivity, problems, low=0.0)
        _check_real("l1_sensitivity", self.l1_sensitivity, problems, low=0.0)
        # Kairouz et al.'s bound needs sigma >= 1/2 per site.
        _check_real("site_sigma", self.site_sigma, problems, low=0.5, low_open=False)
        _check_count("sites", self.sites, problems, maximum=MAX_SITES)
        _check_count("dimension", self.dimension, problems, maximum=MAX_DIMENSION)
        _check_count("steps", self.steps, problems, maximum=MAX_STEPS)
        _check_unit(self.unit, problems)
        if self.cohort is not None:
            _check_count("cohort", self.cohort, problems, maximum=MAX_SITES)
            if isinstance(self.cohort, int) and isinstance(self.sites, int) and self.cohort < self.sites:
                problems.append(
                    f"cohort ({self.cohort}) must be >= sites ({self.sites}): the sites whose noise is in "
                    "the sum are among those that started the round"
                )
        _check_real("sampler_tv", self.sampler_tv, problems, low=0.0, low_open=False, high=MAX_SAMPLER_TV,
                    high_open=True)
        if not problems:
            self._check_sensitivities(problems)
        if problems:
            raise ConfigError(problems)

    def _check_sensitivities(self, problems: list[str]) -> None:
        l2, l1 = float(self.l2_sensitivity), float(self.l1_sensitivity)
        derivable = min(l2 * l2, math.sqrt(self.dimension) * l2)
        if l1 < l2:
            problems.append(f"l1_sensitivity ({l1:g}) is below l2_sensitivity ({l2:g}), impossible for any vector; "
                            "check that the two are not swapped")
        elif l1 < derivable:
            problems.append(
                f"l1_sensitivity ({l1:g}) is below min(l2^2, sqrt(dimension) * l2) = {derivable:g}, the most an "
                f"integer vector of L2 norm {l2:g} in {self.dimension} coordinates can have; use at least that "
                "(DistributedDPEncoder does)")

    def tau(self) -> float:
        """An upper bound on the discrete-vs-continuous slack 10 * sum_{k<n} exp(-2 pi^2 sigma^2 k/(k+1)).

        The first K = min(n - 1, 10^5) terms are summed exactly; the terms decrease in k, so the
        remaining n - 1 - K are each at most the K-th and together at most (n - 1 - K) times it.
        The result is exact for up to 10^5 + 1 sites and never below the true sum (so the Renyi
        bound stays an upper bound), at a cost independent of ``sites``.
        """
        return _tau_upper_bound(int(self.sites), float(self.site_sigma))

    def rdp(self, order: float) -> float:
        """Renyi DP of one step at ``order`` (Kairouz, Liu, Steinke 2021, Proposition 14)."""
        if not order > 1:
            raise ConfigError(f"Renyi order must be > 1, got {order!r}")
        central = math.sqrt(self.sites) * float(self.site_sigma)
        l2 = float(self.l2_sensitivity) / central
        l1 = float(self.l1_sensitivity) / central
        tau, d = self.tau(), float(self.dimension)
        first = order / 2.0 * l2**2 + tau * d
        second = order / 2.0 * (l2**2 + 2.0 * l1 * tau + tau**2 * d)
        third = order / 2.0 * (l2 + math.sqrt(d) * tau) ** 2
        return min(first, second, third)

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "l2_sensitivity": float(self.l2_sensitivity),
            "l1_sensitivity": float(self.l1_sensitivity),
            "site_sigma": float(self.site_sigma),
            "sites": int(self.sites),
            "dimension": int(self.dimension),
            "steps": int(self.steps),
            "unit": self.unit.value,
            # Only present when set, so events without them keep their old record.
            **({"cohort": int(self.cohort)} if self.cohort is not None else {}),
            **({"sampler_tv": float(self.sampler_tv)} if self.sampler_tv else {}),
        }


@functools.lru_cache(maxsize=256)
def _tau_upper_bound(sites: int, sigma: float) -> float:
    exact = min(sites - 1, _TAU_EXACT_TERMS)
    if exact <= 0:
        return 0.0
    k = np.arange(1, exact + 1, dtype=np.float64)
    terms = np.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1))
    return 10.0 * (math.fsum(terms) + (sites - 1 - exact) * float(terms[-1]))


PrivacyEvent = PoissonSampledGaussian | DistributedDiscreteGaussian

_BY_KIND: dict[str, type] = {
    MechanismKind.POISSON_SAMPLED_GAUSSIAN.value: PoissonSampledGaussian,
    MechanismKind.DISTRIBUTED_DISCRETE_GAUSSIAN.value: DistributedDiscreteGaussian,
}


def event_from_record(record: Any) -> PrivacyEvent:
    """Rebuild an event from ``to_record()`` output; a ConfigError names anything wrong."""
    if not isinstance(record, dict):
        raise ConfigError(f"an event record must be a dict, got {type(record).__name__}")
    kind = record.get("kind")
    cls = _BY_KIND.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ConfigError(f"unknown mechanism kind {_short(kind)}; known: {sorted(_BY_KIND)}")
    fields = {k: v for k, v in record.items() if k != "kind"}
    expected = set(cls.__dataclass_fields__)
    optional = {"unit", "steps", "cohort", "sampler_tv"}
    problems = [f"{cls.__name__} record lacks {name!r}" for name in sorted(expected - set(fields) - optional)]
    problems += [f"{cls.__name__} record has unknown field {name!r}" for name in sorted(set(fields) - expected)]
    if problems:
        raise ConfigError(problems)
    if "unit" in fields:
        try:
            fields["unit"] = PrivacyUnit(fields["unit"])
        except (ValueError, TypeError):
            raise ConfigError(f"unknown privacy unit {_short(fields['unit'])}; known: {[u.value for u in PrivacyUnit]}") from None
    return cls(**fields)
