"""Distributed DP for secure aggregation: the distributed discrete Gaussian (DDGauss).

Kairouz, Liu and Steinke (2021), "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation". Each site, before its update enters secure aggregation:

1. clips its update to L2 norm c (``l2_clip``);
2. zero-pads it to d = a power of two and applies the round's shared random rotation
   U = H D / sqrt(d) (:mod:`securefed.privacy.rotation`), which spreads the mass evenly over the
   coordinates so that the modulus is used efficiently;
3. divides by the granularity gamma and rounds every coordinate to an integer by randomized
   rounding (up with probability equal to the fractional part), repeated until the rounded
   vector's squared L2 norm is at most (the paper's conditional rounding bound)
       Delta_2^2 = min(c^2/gamma^2 + d/4 + sqrt(2 ln(1/beta)) (c/gamma + sqrt(d)/2),
                       (c/gamma + sqrt(d))^2);
   the first term holds with probability >= 1 - beta per try, the second always, since
   rounding moves each coordinate by less than 1. The released integer vector therefore has
   L2 norm <= Delta_2 and, being integral, L1 norm <= min(Delta_2^2, sqrt(d) Delta_2);
4. adds discrete Gaussian noise N_Z(0, sigma^2) per coordinate (Canonne, Kamath, Steinke 2020),
   where sigma^2 = (z c / gamma)^2 / min_sites, so that any min_sites sites together carry the
   target noise z c (in float units) that a central Gaussian mechanism would add;
5. reduces modulo 2^b (b = ``bit_width``) into unsigned integers: what secure aggregation sums.

The decoder maps the modular sum into [-2^(b-1), 2^(b-1)), multiplies by gamma, undoes the
rotation and drops the padding. Privacy is accounted by
:class:`~securefed.privacy.events.DistributedDiscreteGaussian` (Proposition 14 of the paper),
with the sensitivities above and the number of sites whose noise is in the sum.

Choosing gamma. In the integer domain, coordinate j of the aggregate over n sites is
S_j = sum_i (x_ij / gamma + r_ij + noise_ij). Each rotated coordinate x_ij is sub-Gaussian with
variance proxy c^2/d; sites may send the same update, so the signal's proxy is (n c/gamma)^2/d
in the worst case. Rounding errors lie in intervals of length 1 (proxy 1/4 each, Hoeffding) and
the discrete Gaussian is sigma-sub-Gaussian (CKS 2020), so S_j has proxy
    V(gamma) = (n c / gamma)^2 / d + n / 4 + n sigma(gamma)^2.
With n = ``expected_sites`` we require k sqrt(V) <= 2^(b-1) - 1 =: L (``k_stddevs`` of
head-room, the paper's heuristic for modular clipping), which solves to
    gamma >= c sqrt((n^2/d + n z^2/m) / ((L/k)^2 - n/4)).
We take the smallest such gamma (the finest grid), but never finer than
max(c, z c / sqrt(m)) / 2^40: a grid 1e-12 of the clip is far below the precision of any model
update, and stopping there keeps the float64 rotation's rounding error (relative 1e-15) well
inside the conditional rounding's slack (relative sqrt(2 ln(1/beta)) gamma / c) and every value
far inside int64. The grid "works" if, at that gamma, (a) the per-site noise is at least
``MIN_SITE_SIGMA`` integer units, so the discrete-vs-continuous slack tau of Proposition 14 is
negligible (tau d <= 10 n d exp(-pi^2 sigma^2) < 1e-66 n d), and (b) rounding inflates the L2
sensitivity by at most ``MAX_SENSITIVITY_INFLATION`` (Delta_2 gamma / c). Coarser grids only
make both worse, so if the finest one fails no gamma works and the config is refused.

What site-level DP protects. The neighbouring relation is a site's contribution: the released
sum (and everything computed from it) is nearly as likely whether a given surviving site sent
its real update or a zero update (:class:`~securefed.privacy.events.PrivacyUnit` SITE, with the
L2 bound c). It does not hide that the site took part: secure aggregation publishes the list of
survivors whose masks were removed, so participation itself is visible to the coordinator and
to every site. Hiding participation would need sampling the adversary cannot see
(:class:`~securefed.privacy.site_dp.SiteSampling` with HIDDEN_RANDOM) and a protocol that does
not reveal the survivors.

Sampler slack. Each site draws its noise with the vectorised float sampler
(:func:`~securefed.privacy.discrete_gaussian.sample_discrete_gaussian`), whose output is only
within :func:`~securefed.privacy.discrete_gaussian.fast_sampler_tv_bound` of the exact discrete
Gaussian in total variation per coordinate; :meth:`DistributedDPEncoder.event` records that as
``sampler_tv``, and the accountants add (1 + e^eps) sites * d * steps * sampler_tv to delta. At
about 1e-14 per coordinate this is negligible for small models but grows with d: a million
padded coordinates, 10 sites and 100 rounds add about 1e-5 (1 + e^eps).

Modular clipping. If a coordinate of the sum leaves [-2^(b-1), 2^(b-1)) it wraps around and
decodes as a value about 2^b gamma away from the truth; the inverse rotation then spreads that
error over every output coordinate. The head-room makes this rare (probability at most
2 exp(-k^2/2) per coordinate in the worst case of identical updates, far less in practice) but
not impossible, and it cannot be detected after the fact; :meth:`DistributedDPEncoder.error_bound`
holds only when nothing wrapped. Wrapping never weakens privacy (it is post-processing).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from ..errors import ConfigError, PrivacyError
from ..primitives.randomness import RandomSource, uniform_floats
from .discrete_gaussian import fast_sampler_tv_bound, sample_discrete_gaussian
from .events import DistributedDiscreteGaussian, PrivacyUnit
from .rotation import RandomRotation, Rotation, next_power_of_two, rotation_kind
from .site_dp import clip_update, finite_vector

__all__ = [
    "MIN_SITE_SIGMA",
    "MAX_SENSITIVITY_INFLATION",
    "DistributedDPConfig",
    "DistributedDPEncoder",
    "rounded_l2_bound",
    "conditional_round",
]

MIN_SITE_SIGMA = 4.0
MAX_SENSITIVITY_INFLATION = 1.01
# The finest grid relative to c (and to the noise std): 2**-40, see "Choosing gamma".
_FINEST_GRID = 2.0**-40
# Each conditional-rounding try succeeds with probability >= 1 - beta; failing this many times
# in a row means the input broke the norm bound, not bad luck.
_MAX_ROUNDING_ATTEMPTS = 1000
# Exact squared norms split each |value| < 2**53 into 27 high and 26 low bits; blocks of 256
# keep every partial sum of products below 2**63.
_LOW_BITS = 26
_NORM_BLOCK = 256
_UNSIGNED = {32: np.uint32, 64: np.uint64}
_SIGNED = {32: np.int32, 64: np.int64}


def rounded_l2_bound(*, l2_norm: float, dimension: int, beta: float) -> float:
    """Delta_2 of Kairouz, Liu, Steinke 2021: the L2 bound enforced by conditional rounding.

    ``l2_norm`` bounds the scaled vector (c / gamma), ``dimension`` is its length d, ``beta``
    the probability that one unconditional rounding exceeds the first branch of the bound.
    """
    problems: list[str] = []
    if isinstance(l2_norm, bool) or not isinstance(l2_norm, numbers.Real) or not (math.isfinite(l2_norm) and l2_norm >= 0):
        problems.append(f"l2_norm must be a finite number >= 0, got {l2_norm!r}")
    if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
        problems.append(f"dimension must be an int >= 1, got {dimension!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 < beta < 1:
        problems.append(f"beta must be a number in (0, 1), got {beta!r}")
    if problems:
        raise ConfigError(problems)
    norm, d = float(l2_norm), float(dimension)
    tail = math.sqrt(2.0 * math.log(1.0 / beta))
    probable = norm**2 + d / 4.0 + tail * (norm + math.sqrt(d) / 2.0)
    certain = (norm + math.sqrt(d)) ** 2
    return math.sqrt(min(probable, certain))


def _exact_squared_norm(values: np.ndarray) -> int:
    """sum(v^2) as an exact Python int, for int64 values of magnitude below 2**53."""
    magnitude = np.abs(values)
    padded = np.zeros(-(-magnitude.size // _NORM_BLOCK) * _NORM_BLOCK, dtype=np.int64)
    padded[: magnitude.size] = magnitude
    blocks = padded.reshape(-1, _NORM_BLOCK)
    high, low = blocks >> _LOW_BITS, blocks & ((1 << _LOW_BITS) - 1)
    # v^2 = high^2 2^52 + 2 high low 2^26 + low^2; each block sum stays below 2^62.
    return (
        (_block_total(high * high) << (2 * _LOW_BITS))
        + (_block_total(high * low) << (_LOW_BITS + 1))
        + _block_total(low * low)
    )


def _block_total(products: np.ndarray) -> int:
    # int64 sums within blocks, Python ints across them: exact at any length.
    return sum(int(x) for x in products.sum(axis=1))


def conditional_round(
    scaled: np.ndarray, *, l2_bound: float, rng: RandomSource, max_attempts: int = _MAX_ROUNDING_ATTEMPTS
) -> np.ndarray:
    """Randomized rounding of ``scaled`` to int64, retried until the L2 norm is <= ``l2_bound``.

    The squared norm is computed exactly in integers and compared with the exact square of
    ``l2_bound``, so no float rounding can let a vector over the bound through. Raises
    PrivacyError if ``max_attempts`` tries all fail (the input was longer than the bound).
    """
    problems: list[str] = []
    if isinstance(l2_bound, bool) or not isinstance(l2_bound, numbers.Real) or not (math.isfinite(l2_bound) and l2_bound >= 0):
        problems.append(f"l2_bound must be a finite number >= 0, got {l2_bound!r}")
    if not isinstance(rng, RandomSource):
        problems.append(f"rng must be a RandomSource, got {type(rng).__name__}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        problems.append(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    if problems:
        raise ConfigError(problems)
    values = finite_vector(scaled, what="scaled vector")
    if values.size and np.max(np.abs(values)) >= 2.0**52:
        raise ConfigError("scaled vector has entries of 2**52 or more; use a coarser granularity")
    floor = np.floor(values)
    fraction = values - floor
    base = floor.astype(np.int64)
    limit = Fraction(float(l2_bound)) ** 2
    for _ in range(max_attempts):
        rounded = base + (uniform_floats(rng, values.size) < fraction)
        if _exact_squared_norm(rounded) <= limit:
            return rounded
    raise PrivacyError(
        f"conditional rounding failed {max_attempts} times: the update is longer than the "
        "L2 bound the encoder was configured for; clip it to l2_clip first"
    )


def _check_real(name: str, value: object, problems: list[str], *, hint: str, low: float = 0.0,
                high: float = math.inf, high_open: bool = False) -> None:
    if value is None:
        problems.append(f"set {name} ({hint})")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        problems.append(f"{name} must be a finite number ({hint}), got {value!r}")
    elif not value > low or (value >= high if high_open else value > high):
        bounds = f"> {low:g}" if high == math.inf else f"in ({low:g}, {high:g}{')' if high_open else ']'}"
        problems.append(f"{name} must be {bounds} ({hint}), got {value!r}")


def _check_sites(name: str, value: object, problems: list[str], *, hint: str) -> bool:
    if value is None:
        problems.append(f"set {name} ({hint})")
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{name} must be an int >= 1 ({hint}), got {value!r}")
    else:
        return True
    return False


@dataclass(frozen=True, kw_only=True)
class DistributedDPConfig:
    """Parameters of the distributed discrete Gaussian; every problem is reported at once."""

    l2_clip: float | None = None
    noise_multiplier: float | None = None
    expected_sites: int | None = None
    min_sites: int | None = None
    bit_width: int = 32
    beta: float = math.exp(-0.5)
    k_stddevs: float = 4.0
    rotation: Rotation = Rotation.HADAMARD

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_real("l2_clip", self.l2_clip, problems, hint="the L2 norm bound of one site's update")
        _check_real("noise_multiplier", self.noise_multiplier, problems,
                    hint="std of the total noise in the sum over l2_clip")
        expected_ok = _check_sites("expected_sites", self.expected_sites, problems,
                                   hint="the number of sites that start a round")
        min_ok = _check_sites("min_sites", self.min_sites, problems,
                              hint="the secure-aggregation threshold: the fewest sites whose inputs can be summed")
        if expected_ok and min_ok and self.min_sites > self.expected_sites:  # type: ignore[operator]
            problems.append(f"min_sites ({self.min_sites}) cannot exceed expected_sites ({self.expected_sites})")
        if isinstance(self.bit_width, bool) or self.bit_width not in _UNSIGNED:
            problems.append(f"bit_width must be 32 or 64 (the secure-aggregation ring), got {self.bit_width!r}")
        _check_real("beta", self.beta, problems, hint="the conditional rounding failure probability",
                    high=1.0, high_open=True)
        _check_real("k_stddevs", self.k_stddevs, problems, hint="head-room against modular wrap-around")
        try:
            object.__setattr__(self, "rotation", rotation_kind(self.rotation))
        except ConfigError as exc:
            problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class _Grid:
    gamma: float
    site_sigma: float
    l2_sensitivity: float
    l1_sensitivity: float


def _choose_grid(config: DistributedDPConfig, padded: int) -> _Grid:
    """The finest granularity with head-room, checked as described in the module docstring."""
    c, z = float(config.l2_clip), float(config.noise_multiplier)  # type: ignore[arg-type]
    n, m, d = int(config.expected_sites), int(config.min_sites), float(padded)  # type: ignore[arg-type]
    k, bits = float(config.k_stddevs), config.bit_width
    limit = float(2 ** (bits - 1) - 1)
    advice = ("raise bit_width to 64, " if bits == 32 else "") + "lower expected_sites (fewer sites per round) or lower k_stddevs"
    room = (limit / k) ** 2 - n / 4.0
    if room <= 0:
        raise ConfigError(
            f"no granularity fits: the rounding errors of {n} sites alone need more than "
            f"{bits} bits with k_stddevs={k:g} of head-room; {advice}"
        )
    gamma_fit = c * math.sqrt((n * n / d + n * z * z / m) / room)
    gamma = max(gamma_fit, max(c, z * c / math.sqrt(m)) * _FINEST_GRID)
    site_sigma = z * c / (gamma * math.sqrt(m))
    l2 = rounded_l2_bound(l2_norm=c / gamma, dimension=padded, beta=float(config.beta))
    problems: list[str] = []
    if site_sigma < MIN_SITE_SIGMA:
        problems.append(
            f"with {n} expected sites, {padded} padded coordinates and {bits}-bit sums the finest grid "
            f"that leaves k_stddevs={k:g} of head-room gives each site only {site_sigma:.3g} integer "
            f"units of noise (at least {MIN_SITE_SIGMA:g} are needed for the discrete Gaussian "
            f"bound to hold tightly); {advice}"
        )
    inflation = l2 * gamma / c
    if inflation > MAX_SENSITIVITY_INFLATION:
        problems.append(
            f"with {n} expected sites, {padded} padded coordinates and {bits}-bit sums the finest grid "
            f"that leaves k_stddevs={k:g} of head-room is so coarse that rounding inflates the L2 "
            f"sensitivity by {100 * (inflation - 1):.3g}% (at most "
            f"{100 * (MAX_SENSITIVITY_INFLATION - 1):.3g}% allowed); {advice}"
        )
    if problems:
        raise ConfigError(problems)
    # Integer vectors: |x|_2 <= |x|_1 <= min(|x|_2^2, sqrt(d) |x|_2). Nudged up so float
    # rounding of the product can never understate it (DistributedDiscreteGaussian checks it).
    l1 = max(l2, min(l2 * l2, math.sqrt(d) * l2)) * (1.0 + 1e-12)
    return _Grid(gamma=gamma, site_sigma=site_sigma, l2_sensitivity=l2, l1_sensitivity=l1)


@dataclass(frozen=True, eq=False)
class DistributedDPEncoder:
    """Encodes one site's update for secure aggregation and decodes the modular sum.

    Build one per model shape (``dimension`` = length of the flattened update); every site of
    the federation must use the same config and dimension, so that they agree on gamma.
    """

    config: DistributedDPConfig
    dimension: int = field(kw_only=True)
    padded_dimension: int = field(init=False)
    gamma: float = field(init=False)
    site_sigma: float = field(init=False)
    l2_sensitivity: float = field(init=False)
    l1_sensitivity: float = field(init=False)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.config, DistributedDPConfig):
            problems.append(f"config must be a DistributedDPConfig, got {type(self.config).__name__}")
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int) or self.dimension < 1:
            problems.append(f"dimension must be an int >= 1 (the flattened update's length), got {self.dimension!r}")
        elif self.dimension > 2**40:
            problems.append(f"dimension must be at most 2**40, got {self.dimension}")
        if problems:
            raise ConfigError(problems)
        padded = next_power_of_two(self.dimension)
        grid = _choose_grid(self.config, padded)
        object.__setattr__(self, "padded_dimension", padded)
        for name in ("gamma", "site_sigma", "l2_sensitivity", "l1_sensitivity"):
            object.__setattr__(self, name, getattr(grid, name))

    @property
    def bit_width(self) -> int:
        return self.config.bit_width

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """np.uint32 or np.uint64: the type of encodings and of their modular sum."""
        return _UNSIGNED[self.config.bit_width]

    def rotation(self, round_seed: bytes) -> RandomRotation:
        """The round's shared rotation."""
        return RandomRotation.for_round(dimension=self.dimension, round_seed=round_seed, kind=self.config.rotation)

    def encode(self, update: np.ndarray, *, round_seed: bytes, rng: RandomSource) -> np.ndarray:
        """Clip, rotate, scale, round and noise ``update``; returns ``padded_dimension`` ring elements.

        ``round_seed`` is shared by all sites of the round (it fixes the rotation); ``rng`` is
        this site's private randomness (rounding and noise) and must be secret.
        """
        if not isinstance(rng, RandomSource):
            raise ConfigError(f"rng must be a RandomSource (this site's secret randomness), got {type(rng).__name__}")
        values = finite_vector(update, length=self.dimension)
        clipped, _ = clip_update(values, float(self.config.l2_clip))  # type: ignore[arg-type]
        scaled = self.rotation(round_seed).rotate(clipped)
        scaled *= 1.0 / self.gamma
        rounded = conditional_round(scaled, l2_bound=self.l2_sensitivity, rng=rng)
        rounded += sample_discrete_gaussian(self.site_sigma, self.padded_dimension, rng)
        # Two's complement: the int64 bits read as uint64 are the value modulo 2**64.
        ring = rounded.view(np.uint64)
        if self.config.bit_width == 32:
            return (ring & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        return ring

    def decode(self, modular_sum: np.ndarray, *, round_seed: bytes) -> np.ndarray:
        """Turn the modular sum of encodings into the float64 noisy sum of clipped updates."""
        total = np.asarray(modular_sum)
        if total.dtype != np.dtype(self.dtype):
            raise ConfigError(
                f"modular_sum must have dtype {np.dtype(self.dtype)} (the {self.bit_width}-bit ring), got {total.dtype}"
            )
        if total.shape != (self.padded_dimension,):
            raise ConfigError(f"modular_sum must have shape ({self.padded_dimension},), got {total.shape}")
        # Reading the ring element as signed maps it into [-2^(b-1), 2^(b-1)).
        signed = np.ascontiguousarray(total).view(_SIGNED[self.bit_width]).astype(np.float64)
        signed *= self.gamma
        return self.rotation(round_seed).unrotate(signed)

    def _check_sites(self, sites: object) -> int:
        if isinstance(sites, bool) or not isinstance(sites, int) or not 1 <= sites <= self.config.expected_sites:  # type: ignore[operator]
            raise ConfigError(
                f"sites must be an int in [1, expected_sites={self.config.expected_sites}] "
                f"(the number of sites whose noise is in the sum), got {sites!r}"
            )
        return sites

    def sum_noise_std(self, *, sites: int) -> float:
        """Per-coordinate std (float units) of the noise in a sum over ``sites`` sites."""
        return self.gamma * self.site_sigma * math.sqrt(self._check_sites(sites))

    def error_bound(self, *, sites: int, failure_probability: float = 1e-6) -> float:
        """An L2 bound on ``decode(sum) - sum of clipped updates`` for ``sites`` summed sites.

        Holds with probability >= 1 - failure_probability provided no coordinate wrapped. The
        error is gamma U^T (sum_i r_i + sum_i noise_i): U^T keeps norms and un-padding only
        drops coordinates; every rounding error is below 1 per coordinate, so
        ||sum_i r_i|| <= sites sqrt(d); the noise has independent sites*sigma^2-sub-Gaussian
        coordinates, so ||noise||^2 <= sites sigma^2 (d + 2 sqrt(d t) + 2 t) with probability
        >= 1 - e^-t (Hsu, Kakade, Zhang 2012, t = ln(1 / failure_probability)).
        """
        count = self._check_sites(sites)
        if isinstance(failure_probability, bool) or not isinstance(failure_probability, numbers.Real) \
                or not 0 < failure_probability < 1:
            raise ConfigError(f"failure_probability must be in (0, 1), got {failure_probability!r}")
        d, t = float(self.padded_dimension), math.log(1.0 / failure_probability)
        rounding = count * math.sqrt(d)
        noise = math.sqrt(count * self.site_sigma**2 * (d + 2.0 * math.sqrt(d * t) + 2.0 * t))
        return self.gamma * (rounding + noise)

    def event(self, *, sites: int, steps: int = 1) -> DistributedDiscreteGaussian:
        """The accounting event for a sum carrying the noise of ``sites`` sites.

        Before the round use ``config.min_sites`` (the worst case secure aggregation allows);
        afterwards the actual number of survivors. Fewer sites means less noise: larger epsilon.
        The event records ``expected_sites`` as its cohort, the most survivors a ledger may later
        settle a worst-case charge to. (Per-site noise of at least MIN_SITE_SIGMA makes the
        Kairouz et al. slack term negligible, so epsilon falls monotonically with more sites and
        the worst case really is ``min_sites``.) It also records the noise sampler's
        total-variation bound as ``sampler_tv`` (module docstring, "Sampler slack").
        """
        return DistributedDiscreteGaussian(
            l2_sensitivity=self.l2_sensitivity,
            l1_sensitivity=self.l1_sensitivity,
            site_sigma=self.site_sigma,
            sites=self._check_sites(sites),
            dimension=self.padded_dimension,
            steps=steps,
            unit=PrivacyUnit.SITE,
            cohort=self.config.expected_sites,
            sampler_tv=fast_sampler_tv_bound(self.site_sigma),
        )
