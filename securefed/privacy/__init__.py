"""Differential privacy: DP-SGD at each site, site-level DP for the federation, accounting, ledger.

- **Accounting** (:mod:`.events`, :mod:`.accounting`, :mod:`.calibration`): mechanisms are
  immutable events; an RDP accountant and a tight PLD accountant compose them. ``epsilon`` and
  ``noise_multiplier_for`` are the notebook helpers.
- **The ledger** (:mod:`.ledger`): one SQLite file per site, hash-chained and Ed25519-signed,
  with a hard (epsilon, delta) budget enforced check-then-commit.
- **DP-SGD** (:mod:`.dpsgd`, an Opacus adapter): ``make_private`` makes a site's model, optimizer
  and data private for a whole federated run, charging the ledger before every round.
  :mod:`.model_compat` makes MONAI networks DP-compatible; :mod:`.losses` has per-sample
  segmentation losses; :mod:`.fast_clipping` is the book-keeping per-sample clipping engine.
- **Site-level DP** (:mod:`.distributed`, :mod:`.site_dp`): the distributed discrete Gaussian
  under secure aggregation (default), or central Gaussian noise on the aggregate (opt-in).

The torch-based parts load on first use, so ``import securefed.privacy`` stays light.
"""

from __future__ import annotations

from securefed._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # accounting
    "MechanismKind": "events",
    "PrivacyUnit": "events",
    "PoissonSampledGaussian": "events",
    "DistributedDiscreteGaussian": "events",
    "event_from_record": "events",
    "AccountantKind": "accounting",
    "RdpAccountant": "accounting",
    "PldAccountant": "accounting",
    "make_accountant": "accounting",
    "compose_epsilon": "accounting",
    "compose_delta": "accounting",
    "epsilon": "calibration",
    "noise_multiplier_for": "calibration",
    # the ledger
    "PrivacyLedger": "ledger",
    "PrivacyBudget": "ledger",
    "PrivacySpend": "ledger",
    "LedgerEntry": "ledger",
    "LedgerGenesis": "ledger",
    "LedgerHead": "ledger",
    "LedgerProblem": "ledger",
    "ProblemKind": "ledger",
    "EntryKind": "ledger",
    "verify_ledger_file": "ledger",
    # site-level DP
    "DistributedDPConfig": "distributed",
    "DistributedDPEncoder": "distributed",
    "Rotation": "rotation",
    "NoiseMode": "site_dp",
    "SamplingVisibility": "site_dp",
    "CentralDPConfig": "site_dp",
    "SiteSampling": "site_dp",
    "clip_update": "site_dp",
    "add_central_noise": "site_dp",
    "central_event": "site_dp",
    "sample_sites": "site_dp",
    "sample_discrete_gaussian": "discrete_gaussian",
    # DP-SGD (torch)
    "DPSGDConfig": "dpsgd_config",
    "ClippingMode": "dpsgd_config",
    "RoundReport": "dpsgd_config",
    "make_private": "dpsgd",
    "PrivateTraining": "dpsgd",
    "make_dp_compatible": "model_compat",
    "check_dp_compatible": "model_compat",
    "require_dp_compatible": "model_compat",
    "CompatibilityReport": "model_compat",
    "per_sample_dice_loss": "losses",
    "per_sample_cross_entropy": "losses",
    "dice_ce_loss": "losses",
    "dice_score": "losses",
    "BookKeepingClipper": "fast_clipping",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
