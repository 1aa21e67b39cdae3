"""The privacy a ledger has spent, kept up to date one entry at a time.

:class:`SpendComposer` holds the effective events of a ledger (each charge, or its settle once
settled) and composes them at the budget's delta with the ledger's accountant:

* RDP (Mironov 2017) adds per-order Renyi bounds, so the composer keeps the running sum of
  every effective event's RDP vector: a charge adds its vector, a settle swaps one vector for
  another, and each epsilon is one conversion of the sum. Checking a ledger of n entries then
  costs O(n), not O(n^2). The sum is formed in entry order, exactly as
  ``compose_epsilon(events, accountant="rdp")`` forms it.
* PLD (Koskela et al. 2020, Doroshenko et al. 2022) composes the loss distributions anew for
  each query, after merging events that differ only in ``steps`` by adding their steps (k runs
  of a mechanism are its k-fold composition), so a long ledger of identical rounds costs one
  composition of a few distinct mechanisms.

Writer and verifier both go through this class, in the same order, so a recorded epsilon is
reproduced bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from .accounting import AccountantKind, compose_epsilon, epsilon_with_sampler_slack, sampler_slack
from .events import MAX_STEPS, PrivacyEvent
from .rdp import DEFAULT_ORDERS, epsilon_from_rdp, event_rdp

__all__ = ["SpendComposer", "merge_identical_events", "compose_effective"]

# A settle may leave the total where it was up to float rounding of the running sum.
_SETTLE_RELATIVE_SLACK = 1e-12


def merge_identical_events(events: Sequence[PrivacyEvent]) -> tuple[PrivacyEvent, ...]:
    """Merge events that differ only in ``steps`` into one with the steps added, in first-seen order."""
    steps: dict[PrivacyEvent, int] = {}
    for event in events:
        key = dataclasses.replace(event, steps=1)
        steps[key] = steps.get(key, 0) + event.steps
    # A merged count may pass the cap on an event's steps: split it into capped pieces.
    merged: list[PrivacyEvent] = []
    for key, total in steps.items():
        while total > 0:
            merged.append(dataclasses.replace(key, steps=min(total, MAX_STEPS)))
            total -= MAX_STEPS
    return tuple(merged)


@functools.lru_cache(maxsize=512)
def _compose_merged(events: tuple[PrivacyEvent, ...], delta: float, accountant: AccountantKind) -> float:
    return float(compose_epsilon(list(events), delta=delta, accountant=accountant))


def compose_effective(events: Sequence[PrivacyEvent], *, delta: float, accountant: AccountantKind) -> float:
    """Epsilon of ``events`` composed at ``delta``; 0 for none."""
    if not events:
        return 0.0
    return _compose_merged(merge_identical_events(events), delta, accountant)


class SpendComposer:
    """The effective events of one ledger and their composed epsilon."""

    def __init__(self, *, accountant: AccountantKind, delta: float) -> None:
        self.accountant = accountant
        self.delta = delta
        self._events: dict[int, PrivacyEvent] = {}  # charge seq -> the event counted for it now
        self._rdp: dict[int, np.ndarray] = {}
        self._total = np.zeros(len(DEFAULT_ORDERS))

    @property
    def _is_rdp(self) -> bool:
        return self.accountant is AccountantKind.RDP

    def events(self) -> list[PrivacyEvent]:
        return list(self._events.values())

    def event_for(self, charge_seq: int) -> PrivacyEvent | None:
        return self._events.get(charge_seq)

    # -- updating ------------------------------------------------------------------------------

    def charge(self, seq: int, event: PrivacyEvent) -> None:
        if self._is_rdp:
            vector = event_rdp(event, DEFAULT_ORDERS)
            self._total = self._total + vector
            self._rdp[seq] = vector
        self._events[seq] = event

    def settle(self, charge_seq: int, event: PrivacyEvent) -> None:
        if self._is_rdp:
            vector = event_rdp(event, DEFAULT_ORDERS)
            self._total = self._total_with(charge_seq, vector)
            self._rdp[charge_seq] = vector
        self._events[charge_seq] = event

    # -- querying ------------------------------------------------------------------------------

    def epsilon(self) -> float:
        return self.epsilon_if()

    def epsilon_if(self, *, add: PrivacyEvent | None = None,
                   settle: tuple[int, PrivacyEvent] | None = None) -> float:
        """Epsilon after charging ``add`` or settling ``settle = (charge seq, event)``; changes nothing."""
        if self._is_rdp:
            total = self._total
            if settle is not None:
                total = self._total_with(settle[0], event_rdp(settle[1], DEFAULT_ORDERS))
            if add is not None:
                total = total + event_rdp(add, DEFAULT_ORDERS)
            if add is None and not self._events:
                return 0.0
        in_force = dict(self._events)
        if settle is not None:
            in_force[settle[0]] = settle[1]
        events = list(in_force.values()) + ([add] if add is not None else [])
        if self._is_rdp:
            # As compose_epsilon does: charge the noise samplers' slack on top of the RDP bound.
            return float(epsilon_with_sampler_slack(
                lambda delta: epsilon_from_rdp(DEFAULT_ORDERS, total, delta=delta),
                delta=self.delta, slack=sampler_slack(events)))
        return compose_effective(events, delta=self.delta, accountant=self.accountant)

    def alone(self, event: PrivacyEvent) -> float:
        """Epsilon of ``event`` by itself at the ledger's delta."""
        return compose_effective([event], delta=self.delta, accountant=self.accountant)

    def settle_cost_violation(self, charge_seq: int, event: PrivacyEvent) -> str | None:
        """Why settling ``charge_seq`` with ``event`` would raise the spend, or None if it would not."""
        charged = self._events[charge_seq]
        settled_alone, charged_alone = self.alone(event), self.alone(charged)
        if not settled_alone <= charged_alone:
            return (f"the settled event alone costs epsilon {settled_alone!r}, more than the "
                    f"{charged_alone!r} charged")
        if self._is_rdp:
            higher = event_rdp(event, DEFAULT_ORDERS) > self._rdp[charge_seq]
            if higher.any():
                order = DEFAULT_ORDERS[int(np.argmax(higher))]
                return f"the settled event costs more than the charged one at Renyi order {order:g}"
        before, after = self.epsilon(), self.epsilon_if(settle=(charge_seq, event))
        if not after <= before * (1.0 + _SETTLE_RELATIVE_SLACK):
            return f"settling would raise the spend from epsilon {before!r} to {after!r}"
        return None

    def _total_with(self, charge_seq: int, vector: np.ndarray) -> np.ndarray:
        old = self._rdp[charge_seq]
        if np.all(np.isfinite(old)):
            return (self._total - old) + vector
        # inf - inf is NaN: re-add every vector instead.
        total = np.zeros(len(DEFAULT_ORDERS))
        for seq, existing in self._rdp.items():
            total = total + (vector if seq == charge_seq else existing)
        return total
