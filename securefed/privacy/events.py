"""Privacy events: immutable descriptions of mechanism executions that accountants consume.

An event says what ran, not what it cost: the cost depends on the accountant and on delta, and a
regulator re-deriving the cost from a ledger needs the parameters, not our arithmetic. Every event
round-trips through ``to_record`` / ``event_from_record`` (plain JSON types) so the ledger can
store it and a verifier can recompute epsilon from it.
"""

from __future__ import annotations

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
]


class MechanismKind(Enum):
    POISSON_SAMPLED_GAUSSIAN = "poisson-sampled-gaussian"
    DISTRIBUTED_DISCRETE_GAUSSIAN = "distributed-discrete-gaussian"


class PrivacyUnit(Enum):
    """What one neighbouring change covers: one patient's record, or a whole site's data."""

    RECORD = "record"
    SITE = "site"


def _check_real(name: str, value: object, problems: list[str], *, low: float, high: float = math.inf,
                low_open: bool = True, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append(f"{name} must be a finite number, got {value!r}")
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        problems.append(f"{name} must lie in {left}{low:g}, {high:g}{right}, got {value!r}")


def _check_count(name: str, value: object, problems: list[str], *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{name} must be an int >= {minimum}, got {value!r}")


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
        _check_count("steps", self.steps, problems)
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
    """

    l2_sensitivity: float
    l1_sensitivity: float
    site_sigma: float
    sites: int
    dimension: int
    steps: int = 1
    unit: PrivacyUnit = PrivacyUnit.SITE

    kind = MechanismKind.DISTRIBUTED_DISCRETE_GAUSSIAN

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_real("l2_sensitivity", self.l2_sensitivity, problems, low=0.0)
        _check_real("l1_sensitivity", self.l1_sensitivity, problems, low=0.0)
        # Kairouz et al.'s bound needs sigma >= 1/2 per site.
        _check_real("site_sigma", self.site_sigma, problems, low=0.5, low_open=False)
        _check_count("sites", self.sites, problems)
        _check_count("dimension", self.dimension, problems)
        _check_count("steps", self.steps, problems)
        _check_unit(self.unit, problems)
        if problems:
            raise ConfigError(problems)

    def tau(self) -> float:
        """The discrete-vs-continuous slack: 10 * sum_{k<n} exp(-2 pi^2 sigma^2 k / (k + 1))."""
        k = np.arange(1, self.sites, dtype=np.float64)
        return 10.0 * math.fsum(np.exp(-2.0 * math.pi**2 * float(self.site_sigma) ** 2 * k / (k + 1)))

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
        }


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
        raise ConfigError(f"unknown mechanism kind {kind!r}; known: {sorted(_BY_KIND)}")
    fields = {k: v for k, v in record.items() if k != "kind"}
    expected = set(cls.__dataclass_fields__)
    problems = [f"{cls.__name__} record lacks {name!r}" for name in sorted(expected - set(fields) - {"unit", "steps"})]
    problems += [f"{cls.__name__} record has unknown field {name!r}" for name in sorted(set(fields) - expected)]
    if problems:
        raise ConfigError(problems)
    if "unit" in fields:
        try:
            fields["unit"] = PrivacyUnit(fields["unit"])
        except ValueError:
            raise ConfigError(f"unknown privacy unit {fields['unit']!r}; known: {[u.value for u in PrivacyUnit]}") from None
    return cls(**fields)
