"""Privacy accountants: compose privacy events and report (epsilon, delta).

Two families, chosen by :class:`AccountantKind`:

* RDP (Renyi DP; Mironov 2017, Mironov, Talwar and Zhang 2019) adds per-order Renyi bounds and
  converts once at the end. Cheap, handles every event we emit, including the distributed
  discrete Gaussian of Kairouz, Liu and Steinke (2021), but loose by 10-30% at typical settings.
* PLD (privacy loss distributions; Meiser and Mohammadi 2018, Koskela et al. 2020, Doroshenko et
  al. 2022) composes the exact loss distribution numerically. Tight (a certified upper bound
  within a fraction of a percent), slower, and only for the Poisson-subsampled Gaussian. "prv"
  (privacy random variables, Gopi, Lee and Wutschitz 2021) names the same idea, so it is an
  alias. Both the PLD and the RDP results are valid upper bounds, so the PLD accountant reports
  the smaller of the two (which also covers the rare settings, tiny deltas or extreme grids,
  where the certified PLD is loose or cannot be computed at all).

Sampler slack. A distributed discrete Gaussian event whose sampler is only eta-close to the
exact one in total variation per coordinate (``sampler_tv``) runs a mechanism within H = sites *
dimension * steps * eta of the ideal one; the ideal one is (eps, delta_mech(eps))-DP, so the real
one is (eps, delta_mech(eps) + (1 + e^eps) H)-DP. Every accountant adds that term: ``delta`` is
the sum, and ``epsilon(delta)`` is the least eps whose sum fits in delta, found by iterating
eps <- epsilon_mech(delta - (1 + e^eps) H) upward from below; a PrivacyError says when H alone
leaves no room.

An accountant holds the events composed so far (``.events``), so a ledger verifier can re-derive
any reported epsilon from them. Privacy units are not mixed up here: composition is the same
arithmetic whatever the unit, and which neighbouring relation a total protects is the ledger's
business (a site-level event also protects each record of that site).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import ClassVar

import numpy as np

from ..errors import ConfigError, PrivacyError, UnsupportedMechanismError
from .events import DistributedDiscreteGaussian, PoissonSampledGaussian, PrivacyEvent
from .pld import ComposedPld, compose_sampled_gaussians
from .rdp import DEFAULT_ORDERS, delta_from_rdp, epsilon_from_rdp, event_rdp, validate_orders

__all__ = [
    "AccountantKind",
    "accountant_kind",
    "Accountant",
    "RdpAccountant",
    "PldAccountant",
    "make_accountant",
    "compose_epsilon",
    "compose_delta",
    "sampler_slack",
    "epsilon_with_sampler_slack",
]


# Iterations of the sampler-slack search (it converges geometrically, at rate about H / delta).
_SAMPLER_ROUNDS = 200


class AccountantKind(Enum):
    RDP = "rdp"
    PLD = "pld"


_KIND_NAMES = {"rdp": AccountantKind.RDP, "pld": AccountantKind.PLD, "prv": AccountantKind.PLD}


def _kind_problem(value: object) -> str | None:
    if isinstance(value, AccountantKind):
        return None
    if isinstance(value, str) and value.strip().lower() in _KIND_NAMES:
        return None
    return f"accountant must be one of {sorted(_KIND_NAMES)} ('prv' is an alias of 'pld'), got {value!r}"


def accountant_kind(value: str | AccountantKind) -> AccountantKind:
    """Parse an accountant name ("rdp", "pld", or its alias "prv"); ConfigError otherwise."""
    problem = _kind_problem(value)
    if problem:
        raise ConfigError(problem)
    return value if isinstance(value, AccountantKind) else _KIND_NAMES[value.strip().lower()]


def _check_delta(delta: object) -> str | None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        return f"delta must be a number in (0, 1), typically below 1/(number of records), got {delta!r}"
    return None


def _check_epsilon(epsilon: object) -> str | None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or math.isnan(epsilon) or epsilon < 0:
        return f"epsilon must be a number >= 0, got {epsilon!r}"
    return None


class Accountant(ABC):
    """Composes privacy events; ``epsilon(delta)`` and ``delta(epsilon)`` report the total."""

    kind: ClassVar[AccountantKind]

    def __init__(self) -> None:
        self._events: list[PrivacyEvent] = []

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """Every event composed so far, in order."""
        return tuple(self._events)

    def compose(self, event: PrivacyEvent) -> None:
        """Add one event (all its steps) to the total; raises before changing anything."""
        if not isinstance(event, (PoissonSampledGaussian, DistributedDiscreteGaussian)):
            raise ConfigError(f"expected a privacy event (PoissonSampledGaussian or DistributedDiscreteGaussian), "
                              f"got {type(event).__name__}")
        self._absorb(event)
        self._events.append(event)

    @property
    def sampler_slack(self) -> float:
        """H of the events composed so far (see :func:`sampler_slack`)."""
        return sampler_slack(self._events)

    def epsilon(self, delta: float) -> float:
        """Smallest epsilon this accountant can certify at ``delta``; math.inf if unbounded."""
        problem = _check_delta(delta)
        if problem:
            raise ConfigError(problem)
        if not self._events:
            return 0.0
        return epsilon_with_sampler_slack(self._epsilon, delta=float(delta), slack=self.sampler_slack)

    def delta(self, epsilon: float) -> float:
        """Smallest delta this accountant can certify at ``epsilon``."""
        problem = _check_epsilon(epsilon)
        if problem:
            raise ConfigError(problem)
        if not self._events:
            return 0.0
        slack = self.sampler_slack
        if slack == 0:
            return self._delta(float(epsilon))
        if epsilon > 700:  # (1 + e^eps) H overflows: no meaningful delta
            return 1.0
        return min(1.0, self._delta(float(epsilon)) + (1.0 + math.exp(epsilon)) * slack)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(events={len(self._events)})"

    @abstractmethod
    def _absorb(self, event: PrivacyEvent) -> None:
        """Fold ``event`` into the running state, or raise UnsupportedMechanismError."""

    @abstractmethod
    def _epsilon(self, delta: float) -> float: ...

    @abstractmethod
    def _delta(self, epsilon: float) -> float: ...


class RdpAccountant(Accountant):
    """Renyi DP on a fixed order grid (dp-accounting's default grid unless ``orders`` is given)."""

    kind = AccountantKind.RDP

    def __init__(self, *, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        super().__init__()
        self._orders = validate_orders(orders)
        self._rdp = np.zeros(len(self._orders))

    @property
    def orders(self) -> tuple[float, ...]:
        return self._orders

    @property
    def rdp(self) -> np.ndarray:
        """The composed Renyi bound at each order (a copy)."""
        return self._rdp.copy()

    def _absorb(self, event: PrivacyEvent) -> None:
        self._rdp = self._rdp + event_rdp(event, self._orders)

    def _epsilon(self, delta: float) -> float:
        return epsilon_from_rdp(self._orders, self._rdp, delta=delta)

    def _delta(self, epsilon: float) -> float:
        return delta_from_rdp(self._orders, self._rdp, epsilon=epsilon)


class PldAccountant(Accountant):
    """Numerical privacy loss distributions (Poisson-subsampled Gaussian events only).

    Reports the smaller of the certified PLD bound and the RDP bound (both valid), and the RDP
    bound alone where the PLD cannot be certified (a PrivacyError from the PLD module).
    """

    kind = AccountantKind.PLD

    def __init__(self) -> None:
        super().__init__()
        self._composed: ComposedPld | None = None
        self._renyi = RdpAccountant()

    def _absorb(self, event: PrivacyEvent) -> None:
        if not isinstance(event, PoissonSampledGaussian):
            raise UnsupportedMechanismError(
                f"the PLD accountant cannot account for {type(event).__name__} (no loss distribution is "
                "implemented for the distributed discrete Gaussian); use accountant='rdp', which applies "
                "Kairouz, Liu and Steinke's Renyi bound")
        self._renyi.compose(event)
        self._composed = None  # recomposed lazily on the next query

    def _pld(self) -> ComposedPld:
        if self._composed is None:
            self._composed = compose_sampled_gaussians(
                [(event.sample_rate, event.noise_multiplier, event.steps) for event in self._events])
        return self._composed

    def _epsilon(self, delta: float) -> float:
        renyi = self._renyi.epsilon(delta)
        try:
            return min(self._pld().epsilon(delta), renyi)
        except PrivacyError:
            return renyi

    def _delta(self, epsilon: float) -> float:
        renyi = self._renyi.delta(epsilon)
        try:
            return min(self._pld().delta(epsilon), renyi)
        except PrivacyError:
            return renyi


def sampler_slack(events: Iterable[PrivacyEvent]) -> float:
    """H = sum of sites * dimension * steps * sampler_tv over the distributed discrete Gaussians."""
    return math.fsum(float(event.sites) * event.dimension * event.steps * event.sampler_tv
                     for event in events if isinstance(event, DistributedDiscreteGaussian))


def epsilon_with_sampler_slack(mechanism_epsilon: Callable[[float], float], *, delta: float, slack: float) -> float:
    """Least eps with delta_mech(eps) + (1 + e^eps) * slack <= delta (module docstring).

    ``mechanism_epsilon(d)`` is the mechanism's epsilon at delta d, nonincreasing in d. With no
    slack this is just ``mechanism_epsilon(delta)``. Raises PrivacyError when the slack leaves
    no room.
    """
    if slack == 0:
        return mechanism_epsilon(delta)

    def epsilon_at(at: float) -> float:  # mechanism_epsilon(delta - (1 + e^at) H)
        budget = delta - (1.0 + math.exp(at)) * slack if at <= 700 else -1.0
        if budget <= 0:
            raise PrivacyError(
                f"the noise samplers' total-variation slack H = {slack:.3g} (sites * dimension * steps * "
                f"sampler_tv) leaves no room in delta = {delta:.3g} at epsilon {at:.3g}; use fewer "
                "coordinates or rounds, an exact sampler, or a larger delta")
        return mechanism_epsilon(budget)

    # Nondecreasing iterates below the least fixed point; stop once they settle.
    eps = epsilon_at(0.0)
    for _ in range(_SAMPLER_ROUNDS):
        if math.isinf(eps):
            return eps
        # A point a hair above: if its own budget already allows it, it satisfies the sum.
        above = eps * (1.0 + 1e-9) + 1e-12
        if epsilon_at(above) <= above:
            return above
        eps = epsilon_at(eps)
    raise PrivacyError(f"the sampler slack H = {slack:.3g} is too close to delta = {delta:.3g} for a stable "
                       "epsilon; use fewer coordinates or rounds, an exact sampler, or a larger delta")


_ACCOUNTANTS: dict[AccountantKind, type[Accountant]] = {
    AccountantKind.RDP: RdpAccountant,
    AccountantKind.PLD: PldAccountant,
}


def make_accountant(kind: str | AccountantKind = "rdp") -> Accountant:
    """A fresh, empty accountant of the given kind ("rdp", "pld" or "prv")."""
    return _ACCOUNTANTS[accountant_kind(kind)]()


def _filled(events: Sequence[PrivacyEvent], accountant: str | AccountantKind, problems: list[str]) -> Accountant:
    kind_problem = _kind_problem(accountant)
    if kind_problem:
        problems.append(kind_problem)
    if isinstance(events, (str, bytes)) or not isinstance(events, Iterable):
        problems.append(f"events must be a sequence of privacy events, got {type(events).__name__}")
        events = ()
    events = tuple(events)
    problems.extend(
        f"events[{index}] is a {type(event).__name__}, not a privacy event"
        for index, event in enumerate(events)
        if not isinstance(event, (PoissonSampledGaussian, DistributedDiscreteGaussian))
    )
    if problems:
        raise ConfigError(problems)
    filled = make_accountant(accountant)
    for event in events:
        filled.compose(event)
    return filled


def compose_epsilon(events: Sequence[PrivacyEvent], *, delta: float,
                    accountant: str | AccountantKind = "rdp") -> float:
    """Total epsilon of ``events`` at ``delta`` (0 for no events, math.inf when unbounded)."""
    problems = [p for p in (_check_delta(delta),) if p]
    return _filled(events, accountant, problems).epsilon(delta)


def compose_delta(events: Sequence[PrivacyEvent], *, epsilon: float,
                  accountant: str | AccountantKind = "rdp") -> float:
    """Total delta of ``events`` at ``epsilon`` (0 for no events)."""
    problems = [p for p in (_check_epsilon(epsilon),) if p]
    return _filled(events, accountant, problems).delta(epsilon)
