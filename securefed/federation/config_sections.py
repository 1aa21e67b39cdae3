"""The sections of a federation config, each a frozen dataclass checked on construction.

Strings are accepted where the TOML has them and stored as Enums; every section reports all of
its problems at once in one :class:`~securefed.errors.ConfigError`. The whole config and its
reading and writing live in :mod:`securefed.federation.config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from securefed.errors import ConfigError
from securefed.federation.training_settings import TrainingSettings
from securefed._values import is_int, is_real

if TYPE_CHECKING:
    from securefed.he import HEConfig
    from securefed.privacy import AccountantKind, ClippingMode, DPSGDConfig, PrivacyBudget
    from securefed.secagg import SecAggConfig

__all__ = [
    "Aggregation",
    "RunSettings",
    "SiteSpec",
    "SecAggSettings",
    "PrivacySettings",
    "SiteDPMode",
    "SiteDPSettings",
    "EvaluationSettings",
    "HESettings",
    "DEFAULT_SITES",
    "MAX_SITES",
    "numbered_sites",
    "site_name_problems",
]

DEFAULT_SITES = 4
MAX_SITES = 10_000  # a simulation bound: every site is a process-local object (or a worker's)
MAX_SITE_NAME = 64
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Aggregation(Enum):
    """How site updates are combined: secure aggregation, homomorphic encryption, or in the clear."""

    SECAGG = "secagg"
    HE = "he"
    PLAIN = "plain"




def _int_at_least(name: str, value: object, low: int, problems: list[str], meaning: str = "") -> None:
    if not is_int(value) or value < low:  # type: ignore[operator]
        problems.append(f"{name} must be an integer >= {low}{meaning}, got {value!r}")


def _positive(name: str, value: object, problems: list[str], unset: str = "") -> None:
    if not is_real(value) or value <= 0:  # type: ignore[operator]
        problems.append(f"{name} must be a finite number > 0{unset}, got {value!r}")


def _enum(cls: type[Enum], name: str, value: object, problems: list[str]) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.strip().lower())
        except ValueError:
            pass
    allowed = ", ".join(f'"{m.value}"' for m in cls)
    problems.append(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _as_float(obj: object, *names: str) -> None:
    for name in names:  # ints are accepted for float fields and stored as floats
        value = getattr(obj, name)
        if is_real(value):
            object.__setattr__(obj, name, float(value))


def site_name_problems(name: object) -> list[str]:
    """Why ``name`` cannot name a site (it becomes a directory and a file name); [] if it can."""
    if not isinstance(name, str):
        return [f"a site name must be a string, got {type(name).__name__}"]
    if not name:
        return ["a site name must not be empty"]
    if len(name) > MAX_SITE_NAME:
        return [f"site name {name[:20]!r}... is {len(name)} characters; the limit is {MAX_SITE_NAME}"]
    if not _SITE_NAME.fullmatch(name):
        return [f"site name {name!r} may hold only letters, digits, '-', '_' and '.', starting with a "
                "letter or digit (it names the site's folder and key files)"]
    return []


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The ``[federation]`` section, less the site list (see :attr:`FederationConfig.sites`)."""

    rounds: int = 5
    aggregation: Aggregation = Aggregation.SECAGG
    seed: int = 0
    sites_per_round: int = 0  # 0 = every site every round
    workers: int = 0          # 0 = every site in this process

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "aggregation", _enum(Aggregation, "aggregation", self.aggregation, problems))
        _int_at_least("rounds", self.rounds, 1, problems)
        _int_at_least("seed", self.seed, 0, problems)
        _int_at_least("sites_per_round", self.sites_per_round, 0, problems, " (0 = every site)")
        _int_at_least("workers", self.workers, 0, problems, " (0 = no worker processes)")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True, kw_only=True)
class SiteSpec:
    """One hospital: its name and, optionally, its own epsilon budget and its own local training
    and DP-SGD settings (each None field takes the federation's ``[training]`` / ``[privacy]``
    value; see :meth:`FederationConfig.training_for` and ``privacy_for``)."""

    name: str
    epsilon_budget: float | None = None
    learning_rate: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    batch_size: int | None = None
    epochs_per_round: float | None = None
    steps_per_round: int | None = None
    max_physical_batch_size: int | None = None
    device: str | None = None
    target_epsilon: float | None = None
    max_grad_norm: float | None = None
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        problems = site_name_problems(self.name)
        if self.epsilon_budget is not None:
            _positive("epsilon_budget", self.epsilon_budget, problems, " (or unset)")
            _as_float(self, "epsilon_budget")
        if problems:
            raise ConfigError(problems)

    def overrides(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """This site's values among ``keys`` that are set."""
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def numbered_sites(count: int) -> tuple[SiteSpec, ...]:
    """``count`` sites named site-1 .. site-N, without budget overrides."""
    return tuple(SiteSpec(name=f"site-{i}") for i in range(1, count + 1))


@dataclass(frozen=True, kw_only=True)
class SecAggSettings:
    """The ``[secagg]`` section (see :class:`securefed.secagg.SecAggConfig`).

    ``neighbors`` is ``"auto"``, ``"all"`` (the complete graph) or an even integer;
    ``threshold`` None picks the safe default for the cohort.
    """

    neighbors: int | str = "auto"
    threshold: int | None = None
    bit_width: int = 32
    clip: float = 1.0

    def __post_init__(self) -> None:
        from securefed.secagg.config import SecAggConfig

        problems: list[str] = []
        k, t = self.neighbors, self.threshold
        if isinstance(k, str) and k.strip().lower() in ("auto", "all"):
            k = k.strip().lower()
            object.__setattr__(self, "neighbors", k)
        elif not is_int(k) or k < 2 or k % 2:  # type: ignore[operator]
            problems.append(f'neighbors must be "auto", "all" or an even integer >= 2, got {k!r}')
            k = "auto"
        if t is not None and (not is_int(t) or t < 2):
            problems.append(f"threshold must be an integer >= 2 (or unset for the default), got {t!r}")
            t = None
        _as_float(self, "clip")
        try:  # the protocol's own checks of bit_width and clip (bad fields above swapped for defaults)
            SecAggConfig(neighbors=None if k == "all" else k, threshold=t, bit_width=self.bit_width,
                         clip=self.clip, max_weight=1.0)
        except ConfigError as error:
            problems.extend(error.problems)
        if problems:
            raise ConfigError(problems)

    def to_secagg_config(self) -> SecAggConfig:
        """The protocol's config; every site weighs its update 1.0 (so ``max_weight=1.0``)."""
        from securefed.secagg.config import SecAggConfig

        return SecAggConfig(neighbors=None if self.neighbors == "all" else self.neighbors,
                            threshold=self.threshold, bit_width=self.bit_width, clip=self.clip,
                            max_weight=1.0)


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    """The ``[privacy]`` section: DP-SGD at every site and each site's ledger budget."""

    enabled: bool = True
    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None = calibrate to target_epsilon
    accountant: AccountantKind | str = "rdp"
    clipping: ClippingMode | str = "auto"
    budget_epsilon: float | None = None    # None = target_epsilon

    def __post_init__(self) -> None:
        from securefed.privacy.accounting import accountant_kind
        from securefed.privacy.dpsgd_config import clipping_mode

        problems: list[str] = []
        if not isinstance(self.enabled, bool):
            problems.append(f"enabled must be true or false, got {self.enabled!r}")
        _positive("target_epsilon", self.target_epsilon, problems)
        if not is_real(self.delta) or not 0 < self.delta < 1:  # type: ignore[operator]
            problems.append(f"delta must be a number in (0, 1), well below 1 / (records per site), "
                            f"got {self.delta!r}")
        _positive("max_grad_norm", self.max_grad_norm, problems)
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier, problems, " (or 0 to calibrate)")
        if self.budget_epsilon is not None:
            _positive("budget_epsilon", self.budget_epsilon, problems, " (or 0 for target_epsilon)")
        for name, parse in (("accountant", accountant_kind), ("clipping", clipping_mode)):
            try:
                object.__setattr__(self, name, parse(getattr(self, name)))
            except ConfigError as error:
                problems.extend(error.problems)
        _as_float(self, "target_epsilon", "delta", "max_grad_norm", "noise_multiplier", "budget_epsilon")
        if problems:
            raise ConfigError(problems)

    def dpsgd_config(self, training: TrainingSettings, rounds: int) -> DPSGDConfig | None:
        """Each site's DP-SGD settings for a run of ``rounds`` rounds; None when privacy is off."""
        if not self.enabled:
            return None
        from securefed.privacy.dpsgd_config import DPSGDConfig

        calibrate = self.noise_multiplier is None
        return DPSGDConfig(
            max_grad_norm=self.max_grad_norm, delta=self.delta, batch_size=training.batch_size,
            target_epsilon=self.target_epsilon if calibrate else None,
            noise_multiplier=self.noise_multiplier, planned_rounds=rounds,
            epochs_per_round=training.epochs_per_round, steps_per_round=training.steps_per_round,
            max_physical_batch_size=training.max_physical_batch_size,
            accountant=self.accountant, clipping=self.clipping, device=training.device,
        )

    def budget_epsilon_for(self, site: SiteSpec) -> float:
        """The site's own budget, else ``budget_epsilon``, else ``target_epsilon``."""
        if site.epsilon_budget is not None:
            return site.epsilon_budget
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon

    def budget_for(self, site: SiteSpec) -> PrivacyBudget:
        """The hard (epsilon, delta) budget of ``site``'s privacy ledger."""
        from securefed.privacy.ledger_records import PrivacyBudget

        return PrivacyBudget(epsilon=self.budget_epsilon_for(site), delta=self.delta)


class SiteDPMode(Enum):
    """Site-level DP on top of each site's DP-SGD: none, or distributed noise under secure aggregation."""

    NONE = "none"
    DISTRIBUTED = "distributed"


@dataclass(frozen=True, kw_only=True)
class SiteDPSettings:
    """The ``[site_dp]`` section: site-level DP, which protects a hospital's whole contribution.

    ``distributed``: each site clips its update to L2 norm ``l2_clip`` and adds its share of
    discrete Gaussian noise before masking (:mod:`securefed.privacy.distributed`), so that the
    sum over any ``threshold`` sites carries noise of std ``noise_multiplier * l2_clip``. Each
    site charges that worst case to its ledger before the round and settles it with the sites
    actually summed. The ledger's budget covers DP-SGD and this together.
    """

    mode: SiteDPMode = SiteDPMode.NONE
    l2_clip: float = 0.1
    noise_multiplier: float = 1.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "mode", _enum(SiteDPMode, "mode", self.mode, problems))
        _positive("l2_clip", self.l2_clip, problems)
        _positive("noise_multiplier", self.noise_multiplier, problems)
        _as_float(self, "l2_clip", "noise_multiplier")
        if problems:
            raise ConfigError(problems)

    @property
    def enabled(self) -> bool:
        return self.mode is SiteDPMode.DISTRIBUTED


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    """The ``[evaluation]`` section."""

    every: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        _int_at_least("every", self.every, 1, problems)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True, kw_only=True)
class HESettings:
    """The ``[he]`` section: CKKS parameters of ``aggregation = "he"`` and who deals the key.

    The defaults (ring 4096, primes 60 + 49 bits, scale 2^50) are the largest modulus the HE
    standard allows at 128-bit security for that ring; ``securefed.he.HEConfig`` checks a
    choice for security and for overflow of the sum. Each value of a site's update is clipped
    to ``[-clip, clip]`` before it is encrypted. A round's sum is released only if at least
    ``min_sites`` sites are in it: every site holds the key, so a "sum" of one site would show
    that site's update to the others. ``dealer`` names the site that makes the key ("" = the
    first site).
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 50
    clip: float = 1.0
    min_sites: int = 2
    dealer: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes)
                           if isinstance(self.coeff_mod_bit_sizes, list | tuple) else self.coeff_mod_bit_sizes)
        _int_at_least("min_sites", self.min_sites, 2, problems,
                      " (a sum of one site would show its update to the other key holders)")
        if not isinstance(self.dealer, str):
            problems.append(f"dealer must be a site name or \"\" (the first site), got {self.dealer!r}")
        _positive("clip", self.clip, problems)
        _as_float(self, "clip")
        from securefed.he.config import parameter_problems  # the room for a round's sum is checked with the cohort

        problems += parameter_problems(poly_modulus_degree=self.poly_modulus_degree,
                                       coeff_mod_bit_sizes=self.coeff_mod_bit_sizes, scale_bits=self.scale_bits)
        if problems:
            raise ConfigError(problems)

    def he_config(self, *, max_sites: int, integer_bits: int | None = None) -> HEConfig:
        """The CKKS settings for sums of up to ``max_sites`` sites (each update weighs 1); with
        ``integer_bits``, for exact sums of ring elements of that width (site-level DP)."""
        from securefed.he.config import HEConfig

        config = HEConfig(poly_modulus_degree=self.poly_modulus_degree, coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
                          scale_bits=self.scale_bits, clip=self.clip, max_weight=1.0, max_sites=max_sites)
        return config if integer_bits is None else config.for_integers(integer_bits)

    def dealer_of(self, site_names: list[str]) -> str:
        """The key dealer's name among ``site_names``."""
        return self.dealer or site_names[0]
