"""What a site's DP-SGD training is asked to do, and the plan derived from it (no torch here).

DP-SGD (Abadi et al. 2016) clips every example's gradient to L2 norm ``max_grad_norm`` (C), sums
the clipped gradients of a Poisson-sampled batch, adds N(0, (z C)^2) noise and divides by the
expected batch size. With Poisson sampling at rate q = batch_size / n, each optimizer step is one
step of the Poisson-sampled Gaussian mechanism, which the accountants compose (Mironov, Talwar,
Zhang 2019 for RDP; Koskela et al. 2020 / Doroshenko et al. 2022 for PLD).

Federated training runs the local DP-SGD of a site over several rounds. The privacy cost of round
r is that of ALL steps of rounds 1..r together, so ``target_epsilon`` is calibrated for
``planned_rounds`` rounds at once (not per round), and :class:`TrainingPlan` holds the one noise
multiplier, sample rate and steps-per-round that every round of this training uses.

:class:`DPSGDConfig` validates itself on construction and reports every problem at once; the
checks that need the dataset size (``delta < 1/n``, ``batch_size <= n``) run in
:func:`plan_training`. :func:`training_state` / :func:`restore_rounds` carry a training's charged
rounds over a process restart. The torch side lives in :mod:`securefed.privacy.dpsgd`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import ConfigError, PrivacyError
from .accounting import AccountantKind, accountant_kind, compose_epsilon
from .calibration import noise_multiplier_for
from .events import PoissonSampledGaussian, PrivacyUnit, event_from_record
from .._values import is_count, is_real

__all__ = [
    "ClippingMode",
    "clipping_mode",
    "DPSGDConfig",
    "TrainingPlan",
    "plan_training",
    "RoundReport",
    "training_state",
    "restore_rounds",
]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# Calibration may land a hair above the target once the per-round events are composed one by
# one (the PLD accountant discretises each composition); this many upward nudges of 0.1% each
# is far more than that ever needs.
_MAX_NUDGES = 50
_NUDGE = 1.001
_STATE_FORMAT = "securefed-dpsgd-state"
_STATE_VERSION = 1


class ClippingMode(Enum):
    """How per-sample gradients are clipped.

    ``PER_SAMPLE``: Opacus' hooks materialise every example's gradient (Opacus' default).
    ``GHOST``: Opacus' fast gradient / ghost clipping (two backward passes, per-sample norms only).
    ``FAST``: securefed's book-keeping engine (:mod:`securefed.privacy.fast_clipping`).
    ``AUTO``: FAST when that engine supports every trainable layer (and the training is not
    distributed), else PER_SAMPLE.
    """

    AUTO = "auto"
    PER_SAMPLE = "per-sample"
    GHOST = "ghost"
    FAST = "fast"


def clipping_mode(value: str | ClippingMode) -> ClippingMode:
    """Convert ``"auto"``, ``"per-sample"``, ``"ghost"`` or ``"fast"`` (or the Enum) to the Enum."""
    if isinstance(value, ClippingMode):
        return value
    if isinstance(value, str):
        try:
            return ClippingMode(value.strip().lower().replace("_", "-"))
        except ValueError:
            pass
    known = [m.value for m in ClippingMode]
    raise ConfigError(f"clipping must be one of {known} (or a ClippingMode), got {value!r}")




@dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
    """A site's DP-SGD settings; every field is keyword-only and checked on construction.

    ``max_grad_norm``, ``delta`` and ``batch_size`` are required (they default to None only so
    that a missing one is reported together with every other problem). Exactly one of
    ``target_epsilon`` (the noise multiplier is calibrated so that ``planned_rounds`` rounds
    together spend it) and ``noise_multiplier`` must be set. A round is ``epochs_per_round``
    passes over the data in expectation (``steps_per_round = round(epochs * n / batch_size)``)
    or exactly ``steps_per_round`` optimizer steps; neither means one epoch.
    ``max_physical_batch_size`` splits each Poisson batch into chunks that fit in memory
    without changing the logical batch (the privacy analysis) or the number of steps.
    ``device`` is ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    ``distributed=True`` trains one logical batch across the processes of a ``torchrun`` launch
    with Opacus' DPDDP (see :func:`securefed.privacy.dpsgd.make_private`).
    """

    max_grad_norm: float | None = None
    delta: float | None = None
    batch_size: int | None = None
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    planned_rounds: int = 1
    epochs_per_round: float | None = None
    steps_per_round: int | None = None
    max_physical_batch_size: int | None = None
    accountant: AccountantKind = AccountantKind.RDP
    clipping: ClippingMode = ClippingMode.AUTO
    device: str = "auto"
    distributed: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.max_grad_norm is None:
            problems.append("set max_grad_norm, the per-example L2 clipping bound (e.g. 1.0): "
                            "without it no gradient has bounded sensitivity")
        elif not is_real(self.max_grad_norm) or self.max_grad_norm <= 0:
            problems.append(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if self.delta is None:
            problems.append("set delta, the target failure probability (well below 1/dataset size, "
                            "e.g. 1e-5 for up to ~10^4 records)")
        elif not is_real(self.delta) or not 0 < self.delta < 1:
            problems.append(f"delta must be a number in (0, 1), got {self.delta!r}")
        if self.batch_size is None:
            problems.append("set batch_size, the expected logical batch size "
                            "(Poisson sample rate = batch_size / dataset size)")
        elif not is_count(self.batch_size):
            problems.append(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        self._check_noise(problems)
        self._check_round_length(problems)
        if self.max_physical_batch_size is not None and not is_count(self.max_physical_batch_size):
            problems.append("max_physical_batch_size must be None or an int >= 1, "
                            f"got {self.max_physical_batch_size!r}")
        self._normalise_modes(problems)
        if problems:
            raise ConfigError(problems)

    def _check_noise(self, problems: list[str]) -> None:
        if self.target_epsilon is None and self.noise_multiplier is None:
            problems.append("set exactly one of target_epsilon (the noise is calibrated to it) "
                            "or noise_multiplier (the epsilon follows from it); neither is set")
        elif self.target_epsilon is not None and self.noise_multiplier is not None:
            problems.append("set only one of target_epsilon or noise_multiplier, not both: "
                            "the noise either is calibrated or is given")
        if self.target_epsilon is not None and (not is_real(self.target_epsilon) or self.target_epsilon <= 0):
            problems.append(f"target_epsilon must be a finite number > 0, got {self.target_epsilon!r}")
        if self.noise_multiplier is not None and (not is_real(self.noise_multiplier) or self.noise_multiplier <= 0):
            problems.append(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier!r}")
        if not is_count(self.planned_rounds):
            problems.append(f"planned_rounds must be an int >= 1, got {self.planned_rounds!r}")

    def _check_round_length(self, problems: list[str]) -> None:
        if self.epochs_per_round is not None and self.steps_per_round is not None:
            problems.append("set at most one of epochs_per_round or steps_per_round")
        if self.epochs_per_round is not None and (not is_real(self.epochs_per_round) or self.epochs_per_round <= 0):
            problems.append(f"epochs_per_round must be a finite number > 0, got {self.epochs_per_round!r}")
        if self.steps_per_round is not None and not is_count(self.steps_per_round):
            problems.append(f"steps_per_round must be an int >= 1, got {self.steps_per_round!r}")

    def _normalise_modes(self, problems: list[str]) -> None:
        # Strings are accepted at the boundary and stored as Enums (frozen: set via object).
        try:
            object.__setattr__(self, "accountant", accountant_kind(self.accountant))
        except ConfigError as exc:
            problems.extend(exc.problems)
        try:
            object.__setattr__(self, "clipping", clipping_mode(self.clipping))
        except ConfigError as exc:
            problems.extend(exc.problems)
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            problems.append(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not isinstance(self.distributed, bool):
            problems.append(f"distributed must be True or False, got {self.distributed!r}")
        elif self.distributed and self.clipping is ClippingMode.FAST:
            problems.append("clipping='fast' does not support distributed training; "
                            "use clipping='per-sample' or 'ghost' (or 'auto') with distributed=True")


@dataclass(frozen=True, kw_only=True)
class TrainingPlan:
    """The mechanism every round of one training runs: fixed once the dataset size is known."""

    dataset_size: int
    batch_size: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    planned_rounds: int
    delta: float
    accountant: AccountantKind
    calibrated: bool

    def round_event(self) -> PoissonSampledGaussian:
        """The privacy event of one round: ``steps_per_round`` Poisson-sampled Gaussian steps."""
        return PoissonSampledGaussian(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                                      steps=self.steps_per_round, unit=PrivacyUnit.RECORD)


def _steps_per_round(config: DPSGDConfig, n: int) -> int:
    if config.steps_per_round is not None:
        return config.steps_per_round
    epochs = 1.0 if config.epochs_per_round is None else float(config.epochs_per_round)
    return max(1, round(epochs * n / config.batch_size))


def plan_training(config: DPSGDConfig, *, dataset_size: int) -> TrainingPlan:
    """Fix the sample rate, the steps per round and the noise multiplier for ``dataset_size``.

    With ``target_epsilon`` the noise is calibrated for all ``planned_rounds`` rounds together
    and then checked by composing the rounds one by one with the configured accountant, so
    ``planned_rounds`` rounds never spend more than the target.
    """
    if not isinstance(config, DPSGDConfig):
        raise ConfigError(f"config must be a DPSGDConfig, got {type(config).__name__}")
    n = dataset_size
    if not is_count(n):
        raise ConfigError(f"the dataset must hold at least one record, got size {n!r}")
    problems = []
    if config.batch_size > n:
        problems.append(f"batch_size={config.batch_size} exceeds the {n} records of the dataset; "
                        f"choose batch_size <= {n}")
    if config.delta >= 1.0 / n:
        problems.append(f"delta={config.delta:g} is not below 1/n = {1.0 / n:.3g} for n={n} records: such a "
                        f"delta allows leaking a whole record; choose delta < 1/n, e.g. {0.1 / n:.1g}")
    if problems:
        raise ConfigError(problems)
    sample_rate = config.batch_size / n
    steps = _steps_per_round(config, n)
    if config.noise_multiplier is not None:
        sigma = float(config.noise_multiplier)
    else:
        sigma = _calibrate(config, sample_rate=sample_rate, steps=steps)
    return TrainingPlan(dataset_size=n, batch_size=config.batch_size, sample_rate=sample_rate,
                        steps_per_round=steps, noise_multiplier=sigma, planned_rounds=config.planned_rounds,
                        delta=float(config.delta), accountant=config.accountant,
                        calibrated=config.noise_multiplier is None)


def _calibrate(config: DPSGDConfig, *, sample_rate: float, steps: int) -> float:
    target = float(config.target_epsilon)
    rounds = config.planned_rounds
    sigma = noise_multiplier_for(target_epsilon=target, delta=config.delta, sample_rate=sample_rate,
                                 steps=steps * rounds, accountant=config.accountant.value)
    for _ in range(_MAX_NUDGES):
        event = PoissonSampledGaussian(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        spent = compose_epsilon([event] * rounds, delta=config.delta, accountant=config.accountant)
        if spent <= target:
            return sigma
        sigma *= _NUDGE
    raise PrivacyError(f"could not calibrate a noise multiplier for target_epsilon={target:g} over "
                       f"{rounds} rounds of {steps} steps: the per-round composition stays above it")


@dataclass(frozen=True, kw_only=True)
class RoundReport:
    """What one call of ``train_round`` did.

    ``epsilon`` is the spend after this round at ``delta`` (all rounds so far; the site's whole
    ledger when one is attached). ``mean_loss`` is a site-local diagnostic computed from the
    raw data: it is NOT differentially private, so do not send it to the server.
    """

    round_id: str
    steps: int
    physical_batches: int
    event: PoissonSampledGaussian
    epsilon: float
    delta: float
    mean_loss: float
    ledger_entry: Any = None


def _plan_record(plan: TrainingPlan) -> dict[str, Any]:
    return {"dataset_size": plan.dataset_size, "batch_size": plan.batch_size, "sample_rate": plan.sample_rate,
            "steps_per_round": plan.steps_per_round, "noise_multiplier": plan.noise_multiplier}


def training_state(plan: TrainingPlan, rounds: list[tuple[str, PoissonSampledGaussian]]) -> dict[str, Any]:
    """A training's plan and charged rounds as plain JSON types (``PrivateTraining.state_dict``)."""
    return {"format": _STATE_FORMAT, "version": _STATE_VERSION, "plan": _plan_record(plan),
            "rounds": [{"round_id": key, "event": event.to_record()} for key, event in rounds]}


def restore_rounds(state: Any, plan: TrainingPlan) -> list[tuple[str, PoissonSampledGaussian]]:
    """The rounds saved by :func:`training_state`, after checking they belong to ``plan``."""
    if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
        raise ConfigError("not a securefed DP-SGD state: pass what PrivateTraining.state_dict() returned")
    if state.get("version") != _STATE_VERSION:
        raise ConfigError(f"unsupported DP-SGD state version {state.get('version')!r}; "
                          f"this securefed reads version {_STATE_VERSION}")
    saved, current = state.get("plan"), _plan_record(plan)
    if saved != current:
        diff = sorted(k for k in current if not isinstance(saved, Mapping) or saved.get(k) != current[k])
        raise ConfigError(f"the saved training had a different plan ({', '.join(diff)} differ: saved "
                          f"{saved!r}, now {current!r}); rebuild with the same config and dataset")
    rounds = state.get("rounds")
    if not isinstance(rounds, list) or not all(isinstance(r, Mapping) and {"round_id", "event"} <= set(r)
                                               for r in rounds):
        raise ConfigError("DP-SGD state lacks its list of rounds (each with round_id and event)")
    restored = [(str(r["round_id"]), event_from_record(r["event"])) for r in rounds]
    if any(not isinstance(event, PoissonSampledGaussian) for _, event in restored):
        raise ConfigError("DP-SGD state holds an event that is not a PoissonSampledGaussian")
    return restored
