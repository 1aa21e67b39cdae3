"""The ``[training]`` section: how each site trains locally in one round.

Torch-free on purpose: the configuration is read (and checked) long before any model exists,
and the torch-based trainer (:mod:`securefed.federation.local_training`) imports it from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from securefed.errors import ConfigError
from securefed._values import is_count, is_real

__all__ = ["Optimizer", "TrainingSettings", "DEVICE_PATTERN"]

# The devices DPSGDConfig accepts, so a config that loads also builds its DP-SGD settings.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Optimizer(Enum):
    """The local optimizer. Under DP-SGD it steps on the clipped, noised gradient."""

    SGD = "sgd"
    ADAM = "adam"


def _optimizer(value: object, problems: list[str]) -> Optimizer:
    if isinstance(value, Optimizer):
        return value
    if isinstance(value, str):
        try:
            return Optimizer(value.strip().lower())
        except ValueError:
            pass
    allowed = ", ".join(repr(o.value) for o in Optimizer)
    problems.append(f"optimizer must be one of {allowed}, got {value!r}")
    return Optimizer.SGD




@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """Local training of one round at every site.

    ``batch_size`` is the expected (Poisson) batch size under DP-SGD and the plain batch size
    without it. A round is ``epochs_per_round`` passes over the site's data or exactly
    ``steps_per_round`` optimizer steps (at most one of the two; neither means one epoch).
    ``max_physical_batch_size`` splits a batch into chunks that fit in memory without
    changing the training. ``device``: ``"auto"`` (CUDA when available), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``.
    """

    learning_rate: float = 0.1
    optimizer: Optimizer = Optimizer.SGD
    momentum: float = 0.0
    batch_size: int = 16
    epochs_per_round: float | None = None
    steps_per_round: int | None = None
    max_physical_batch_size: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "optimizer", _optimizer(self.optimizer, problems))
        if not is_real(self.learning_rate) or self.learning_rate <= 0:
            problems.append(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not is_real(self.momentum) or not 0 <= self.momentum < 1:
            problems.append(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if not is_count(self.batch_size):
            problems.append(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.epochs_per_round is not None and (not is_real(self.epochs_per_round)
                                                  or self.epochs_per_round <= 0):
            problems.append(f"epochs_per_round must be a finite number > 0 (or unset), got {self.epochs_per_round!r}")
        if self.steps_per_round is not None and not is_count(self.steps_per_round):
            problems.append(f"steps_per_round must be an int >= 1 (or unset), got {self.steps_per_round!r}")
        if self.epochs_per_round is not None and self.steps_per_round is not None:
            problems.append("set at most one of epochs_per_round or steps_per_round: "
                            "a round is either a number of epochs or a number of steps")
        if self.max_physical_batch_size is not None and not is_count(self.max_physical_batch_size):
            problems.append("max_physical_batch_size must be an int >= 1 (or unset), "
                            f"got {self.max_physical_batch_size!r}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            problems.append(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("learning_rate", "momentum", "epochs_per_round"):
            value = getattr(self, name)
            if is_real(value):  # an int given for a float field is stored as a float
                object.__setattr__(self, name, float(value))
        if problems:
            raise ConfigError(problems)
