"""Site-level differential privacy: clipping, central Gaussian noise and site sampling.

The privacy unit here is a whole site (PrivacyUnit.SITE): neighbouring federations differ by
one hospital's entire contribution, which :func:`clip_update` bounds in L2 norm by ``l2_clip``.

Where the noise comes from is an explicit choice (:class:`NoiseMode`):

* ``DISTRIBUTED`` (the default with secure aggregation): every site adds its share of discrete
  Gaussian noise before its update is masked (:mod:`securefed.privacy.distributed`), so nobody,
  the coordinator included, ever sees an un-noised sum.
* ``CENTRAL``: the coordinator adds N(0, (z c)^2) to the sum itself (the Gaussian mechanism of
  Dwork and Roth 2014, as used for user-level DP by McMahan et al. 2018, "Learning Differentially
  Private Recurrent Language Models"). This trusts the coordinator to add the noise and to
  forget the exact sum, so :func:`add_central_noise` refuses to run unless asked for CENTRAL.

Site sampling amplifies privacy only if the adversary cannot tell who was sampled. Amplification
by Poisson subsampling (the analysis behind DP-SGD and DP-FedAvg, Abadi et al. 2016; Mironov,
Talwar, Zhang 2019) charges a rate-q mechanism less because, from the adversary's point of view,
the target site was left out with probability 1 - q. If the choice is public, fixed or made by
a coordinator the adversary may be (or may observe), the adversary knows whether the target took
part and the round costs the full, unamplified epsilon: :class:`SiteSampling` accounts rate 1
for ``PUBLIC_OR_FIXED`` and only claims ``rate`` for ``HIDDEN_RANDOM`` with a secret random seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..errors import ConfigError, PrivacyError
from ..primitives.randomness import RandomSource, uniform_floats
from .events import PoissonSampledGaussian, PrivacyUnit

__all__ = [
    "NoiseMode",
    "noise_mode",
    "SamplingVisibility",
    "sampling_visibility",
    "CentralDPConfig",
    "SiteSampling",
    "clip_update",
    "add_central_noise",
    "central_event",
    "sample_sites",
    "finite_vector",
]


class NoiseMode(Enum):
    """Who adds the DP noise to the aggregate."""

    DISTRIBUTED = "distributed"
    CENTRAL = "central"


class SamplingVisibility(Enum):
    """Whether the adversary can see which sites take part in a round."""

    HIDDEN_RANDOM = "hidden-random"
    PUBLIC_OR_FIXED = "public-or-fixed"


def _enum_value(enum: type[Enum], value: object, what: str) -> Enum:
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        for member in enum:
            if member.value == value.lower().replace("_", "-"):
                return member
    raise ConfigError(f"unknown {what} {value!r}; known: {[m.value for m in enum]}")


def noise_mode(value: str | NoiseMode) -> NoiseMode:
    """Convert ``"distributed"`` / ``"central"`` (or a NoiseMode) into a :class:`NoiseMode`."""
    return _enum_value(NoiseMode, value, "noise mode")  # type: ignore[return-value]


def sampling_visibility(value: str | SamplingVisibility) -> SamplingVisibility:
    """Convert ``"hidden-random"`` / ``"public-or-fixed"`` into a :class:`SamplingVisibility`."""
    return _enum_value(SamplingVisibility, value, "sampling visibility")  # type: ignore[return-value]


def _positive(name: str, value: object, problems: list[str], *, hint: str) -> None:
    if value is None:
        problems.append(f"set {name} ({hint})")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        problems.append(f"{name} must be a number ({hint}), got {type(value).__name__}")
    elif not (math.isfinite(value) and value > 0):
        problems.append(f"{name} must be finite and > 0 ({hint}), got {value!r}")


def finite_vector(values: object, *, what: str = "update", length: int | None = None) -> np.ndarray:
    """Return ``values`` as a 1-D float64 array, or raise ConfigError naming what is wrong."""
    array = np.asarray(values)
    if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
        raise ConfigError(f"{what} must be a real numeric vector, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ConfigError(f"{what} must be a flat 1-D vector (flatten the model update first), got shape {array.shape}")
    if length is not None and array.size != length:
        raise ConfigError(f"{what} has length {array.size}, expected {length}")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array))
        raise ConfigError(
            f"{what} has {bad.size} NaN or infinite entries (first at index {int(bad[0])}); "
            "fix the training step (e.g. lower the learning rate) or drop this update"
        )
    return array


def clip_update(update: np.ndarray, l2_clip: float) -> tuple[np.ndarray, bool]:
    """Scale ``update`` down to L2 norm ``l2_clip`` if it is longer; return (clipped, was_clipped).

    The norm bound holds up to float64 rounding (relative 1e-15); the distributed mechanism
    re-checks its bound on the integers it releases, so that rounding never leaks.
    """
    problems: list[str] = []
    _positive("l2_clip", l2_clip, problems, hint="the L2 bound of one site's update")
    if problems:
        raise ConfigError(problems)
    values = finite_vector(update)
    with np.errstate(over="ignore"):
        norm = float(np.linalg.norm(values))
    if not math.isfinite(norm):
        # Finite entries whose squares overflow: rescale before taking the norm.
        peak = float(np.max(np.abs(values)))
        norm = peak * float(np.linalg.norm(values / peak))
    if norm <= l2_clip:
        return values.copy(), False
    return values * (float(l2_clip) / norm), True


@dataclass(frozen=True, kw_only=True)
class CentralDPConfig:
    """Central Gaussian noise on the sum of clipped site updates: std ``noise_multiplier * l2_clip``."""

    l2_clip: float | None = None
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        _positive("l2_clip", self.l2_clip, problems, hint="the L2 bound of one site's update")
        _positive("noise_multiplier", self.noise_multiplier, problems, hint="noise std over l2_clip")
        if problems:
            raise ConfigError(problems)

    @property
    def noise_std(self) -> float:
        """The per-coordinate standard deviation of the noise added to the sum."""
        return float(self.noise_multiplier) * float(self.l2_clip)  # type: ignore[arg-type]


def _gaussian(rng: RandomSource, n: int) -> np.ndarray:
    # Box-Muller on 53-bit uniforms; 1 - u lies in (0, 1], so the log is finite.
    half = (n + 1) // 2
    u = uniform_floats(rng, 2 * half).reshape(2, half)
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))
    angle = 2.0 * math.pi * u[1]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def add_central_noise(
    aggregate_sum: np.ndarray, config: CentralDPConfig, *, rng: RandomSource, mode: NoiseMode | str
) -> np.ndarray:
    """Return ``aggregate_sum + N(0, (z c)^2)`` per coordinate; needs ``mode=NoiseMode.CENTRAL``.

    The caller must have clipped every site's update with :func:`clip_update` at
    ``config.l2_clip``. Passing the mode is the explicit opt-in to trusting the coordinator.
    The noise is float64 Gaussian (Box-Muller on 53-bit uniforms); floating-point noise can leak
    through its low-order bits (Mironov 2012), another reason the default is DISTRIBUTED, whose
    noise is integer-valued.
    """
    problems: list[str] = []
    if not isinstance(config, CentralDPConfig):
        problems.append(f"config must be a CentralDPConfig, got {type(config).__name__}")
    if not isinstance(rng, RandomSource):
        problems.append(f"rng must be a RandomSource, got {type(rng).__name__}")
    try:
        chosen = noise_mode(mode)
    except ConfigError as exc:
        problems.extend(exc.problems)
        chosen = None
    if problems:
        raise ConfigError(problems)
    if chosen is not NoiseMode.CENTRAL:
        raise PrivacyError(
            "central noise trusts the coordinator with the exact sum; with NoiseMode.DISTRIBUTED the "
            "sites add the noise (DistributedDPEncoder). Pass mode=NoiseMode.CENTRAL to opt in."
        )
    values = finite_vector(aggregate_sum, what="aggregate_sum")
    return values + config.noise_std * _gaussian(rng, values.size)


@dataclass(frozen=True, kw_only=True)
class SiteSampling:
    """Poisson sampling of sites at ``rate``; ``visibility`` decides whether it amplifies privacy."""

    rate: float = 1.0
    visibility: SamplingVisibility = SamplingVisibility.PUBLIC_OR_FIXED

    def __post_init__(self) -> None:
        problems: list[str] = []
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not (math.isfinite(rate) and 0 < rate <= 1):
            problems.append(f"rate must be a number in (0, 1], got {rate!r}")
        try:
            object.__setattr__(self, "visibility", sampling_visibility(self.visibility))
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)

    @property
    def accounted_rate(self) -> float:
        """The sample rate the accountant may use: ``rate`` only if the choice is hidden."""
        if self.visibility is SamplingVisibility.HIDDEN_RANDOM:
            return float(self.rate)
        return 1.0


def sample_sites(names: Sequence[str], sampling: SiteSampling, rng: RandomSource) -> list[str]:
    """Keep each site independently with probability ``sampling.rate`` (Poisson sampling).

    For ``HIDDEN_RANDOM`` the ``rng`` must be secret from the adversary (SystemRandom, or a seed
    nobody else knows); otherwise the amplification it is accounted with does not hold. The
    result may be empty; the caller decides whether to skip the round. Order is kept.
    """
    problems: list[str] = []
    if isinstance(names, str) or not isinstance(names, Sequence):
        problems.append(f"names must be a sequence of site names, got {type(names).__name__}")
    else:
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            problems.append(f"site names must be non-empty strings, got {bad[:3]!r}")
        elif len(set(names)) != len(names):
            problems.append("site names must be unique")
    if not isinstance(sampling, SiteSampling):
        problems.append(f"sampling must be a SiteSampling, got {type(sampling).__name__}")
    if not isinstance(rng, RandomSource):
        problems.append(f"rng must be a RandomSource, got {type(rng).__name__}")
    if problems:
        raise ConfigError(problems)
    draws = uniform_floats(rng, len(names))
    return [name for name, u in zip(names, draws) if u < sampling.rate]


def central_event(
    config: CentralDPConfig,
    *,
    steps: int = 1,
    sampling: SiteSampling | None = None,
) -> PoissonSampledGaussian:
    """The accounting event of ``steps`` rounds of central noise (unit SITE).

    Amplification by sampling is claimed only through ``sampling``: its
    :attr:`SiteSampling.accounted_rate` is the rate only for HIDDEN_RANDOM sampling and 1
    otherwise. Without ``sampling`` every site is assumed to take part (rate 1).
    """
    problems: list[str] = []
    if not isinstance(config, CentralDPConfig):
        problems.append(f"config must be a CentralDPConfig, got {type(config).__name__}")
    if sampling is not None and not isinstance(sampling, SiteSampling):
        problems.append(f"sampling must be a SiteSampling, got {type(sampling).__name__}")
    if problems:
        raise ConfigError(problems)
    return PoissonSampledGaussian(
        noise_multiplier=float(config.noise_multiplier),  # type: ignore[arg-type]
        sample_rate=1.0 if sampling is None else sampling.accounted_rate,
        steps=steps,
        unit=PrivacyUnit.SITE,
    )
