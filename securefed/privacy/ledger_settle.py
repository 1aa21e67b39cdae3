"""What a settle may change about a charge: only what can make the round cheaper, within bounds.

A charge records the worst case a round may cost before it runs; a settle records what
actually ran once that is known. A settle that could replace a charge with an arbitrary event
would let a site (or a bug) erase spend after the data was touched, so the ledger accepts only
these changes, each fixed by the protocol rather than by the site's word:

* the Poisson-sampled Gaussian (DP-SGD): fewer ``steps`` than charged, say a round stopped early;
  noise multiplier, sample rate and unit unchanged;
* the distributed discrete Gaussian (Kairouz, Liu and Steinke 2021): noise from more surviving
  ``sites`` than the worst case charged, but never more than the ``cohort`` that started the
  round, fixed at charge time; every other parameter unchanged.

Both the writer (:meth:`PrivacyLedger.settle`) and the verifier apply these rules, and both also
check that the settled event costs no more than the charged one, so a settle never raises the
spend.
"""

from __future__ import annotations

import dataclasses

from .events import DistributedDiscreteGaussian, PoissonSampledGaussian, PrivacyEvent

__all__ = ["settle_rule_violation"]


def _changed(charged: PrivacyEvent, settled: PrivacyEvent, *, allowed: str) -> list[str]:
    # Compared field by field (building a hybrid event could itself fail validation).
    return [f.name for f in dataclasses.fields(charged)
            if f.name != allowed and getattr(charged, f.name) != getattr(settled, f.name)]


def settle_rule_violation(charged: PrivacyEvent, settled: PrivacyEvent) -> str | None:
    """Why ``settled`` may not replace ``charged`` (see the module docstring), or None if it may."""
    if (settled.kind, settled.unit) != (charged.kind, charged.unit) or type(settled) is not type(charged):
        return (
            f"it was for a {charged.kind.value} mechanism per {charged.unit.value} and cannot be "
            f"settled with a {settled.kind.value} per {settled.unit.value}"
        )
    if isinstance(charged, PoissonSampledGaussian):
        changed = _changed(charged, settled, allowed="steps")
        if changed:
            return (f"a Poisson-sampled Gaussian charge may be settled only with fewer steps, but the "
                    f"settle changes {', '.join(changed)}")
        if settled.steps > charged.steps:
            return (f"it charged {charged.steps} steps; a settle may record fewer steps (a round that "
                    f"stopped early), not {settled.steps}")
        return None
    if isinstance(charged, DistributedDiscreteGaussian):
        if charged.cohort is None:
            return ("it records no cohort (the sites that started the round), so the number of sites "
                    "whose noise is in the sum cannot be bounded and the charge stands as it is")
        changed = _changed(charged, settled, allowed="sites")
        if changed:
            return ("a distributed discrete Gaussian charge may be settled only with a different number "
                    f"of sites, but the settle changes {', '.join(changed)}")
        if not charged.sites <= settled.sites <= charged.cohort:
            return (f"it charged the noise of {charged.sites} sites out of a cohort of {charged.cohort}; "
                    f"a settle may record between {charged.sites} and {charged.cohort} sites, not "
                    f"{settled.sites}")
        return None
    return f"no settle rule covers a {type(charged).__name__} charge"
