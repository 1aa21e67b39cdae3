"""What a site's ledger holds of DP-SGD (torch-free, so the federation's sites can ask too).

DP-SGD charges record-level Poisson-sampled Gaussian events; other mechanisms (site-level DP)
may share a federated round's id in the same ledger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PrivacyError
from .events import PoissonSampledGaussian, PrivacyUnit

if TYPE_CHECKING:
    from .ledger import PrivacyLedger

__all__ = ["is_dp_sgd_event", "replayable_charge", "dp_sgd_events", "dp_sgd_round_ids"]


def is_dp_sgd_event(event: object) -> bool:
    """Whether ``event`` is of the kind DP-SGD charges (record-level Poisson-sampled Gaussian)."""
    return isinstance(event, PoissonSampledGaussian) and event.unit is PrivacyUnit.RECORD


def replayable_charge(ledger: PrivacyLedger, event: PoissonSampledGaussian, key: str, *, seeded: bool) -> Any:
    """The ledger's DP-SGD charge for round ``key`` that a replay of that round may reuse, or None.

    A replay is only harmless when it reproduces the release: the same mechanism (checked here)
    and the same randomness, which needs a seeded training (noise and sampling derive from the
    seed and the charge's sequence number).
    """
    if not seeded:
        raise ConfigError("replay_charged=True needs a seed: without one a replay would draw fresh noise "
                          "and release a second, differently noised update under the same charge")
    charges = [e for e in ledger.entries() if e.round_id == key and e.event is not None and is_dp_sgd_event(e.event)]
    if not charges:
        return None
    if len(charges) > 1 or charges[0].event != event:
        raise PrivacyError(f"the ledger's DP-SGD charge for round {key!r} is not this round's mechanism "
                           f"({charges[0].event} vs {event}); it cannot be replayed")
    return charges[0]


def dp_sgd_events(ledger: PrivacyLedger) -> list[PoissonSampledGaussian]:
    """The record-level Poisson-sampled Gaussian events the ledger composes (DP-SGD's kind)."""
    return [event for event in ledger.events() if is_dp_sgd_event(event)]


def dp_sgd_round_ids(ledger: PrivacyLedger) -> set[str]:
    """Round ids the ledger has DP-SGD charges for (other mechanisms may share a federated round id)."""
    return {entry.round_id for entry in ledger.entries() if is_dp_sgd_event(entry.event)}
