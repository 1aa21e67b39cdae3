"""One site's local training and evaluation for a federated round (torch adapter).

:class:`LocalTrainer` holds a site's model and training split for the whole run. Every round
it loads the global parameters into the model (in place: the parameter objects that DP-SGD's
hooks and the optimizer hold stay the same), trains locally and returns the update
``local - global``.

With DP-SGD (``dp`` given) the model, optimizer and data are made private ONCE, in the
constructor, by :func:`securefed.privacy.make_private`: the privacy of all rounds composes in one
:class:`~securefed.privacy.PrivateTraining`, which charges the site's ledger before each round
reads any record. Losses are per sample, as DP-SGD needs (cross-entropy for classification;
``(Dice + CE) / 2`` per sample for segmentation). Without ``dp`` (the non-private baseline) the
round is plain minibatch SGD on the batch-mean loss, over a permutation of the data drawn from
the trainer's seed and the round id; a round is ``epochs_per_round`` passes or
``steps_per_round`` steps, as under DP-SGD.

The optimizer's state (momentum, Adam's moments) starts afresh every round: it would otherwise
carry the site's previous local steps into a round that starts from the global model.

``mean_loss`` in a round's result is the site's training loss, computed from the raw data; it is
NOT differentially private and must not leave the site.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from securefed.data import ArrayDataset, TaskKind, TaskSpec
from securefed.errors import ConfigError
from securefed.federation.training_settings import Optimizer, TrainingSettings
from securefed.primitives.randomness import SeededRandom, SystemRandom
from securefed.privacy.dpsgd import make_private
from securefed.privacy.dpsgd_config import DPSGDConfig
from securefed.privacy.dpsgd_data import resolve_device
from securefed.privacy.losses import dice_ce_loss, dice_score

if TYPE_CHECKING:
    from securefed.privacy.ledger import PrivacyLedger

__all__ = ["TrainingSettings", "Optimizer", "LocalTrainer", "LocalRoundResult", "evaluate_model"]

EVALUATION_BATCH = 64


@dataclass(frozen=True)
class LocalRoundResult:
    """What one local round produced.

    ``update`` is ``local - global`` (float32); ``examples`` the size of the site's training
    split; ``mean_loss`` the training loss over the records the round used (not private: keep it
    at the site); ``epsilon`` the site's spend after the round (None without DP); ``steps`` the
    optimizer steps taken.
    """

    update: np.ndarray
    examples: int
    mean_loss: float
    epsilon: float | None
    steps: int


def _per_sample_loss(spec: TaskSpec):  # noqa: ANN202 - a loss function (outputs, targets) -> (B,)
    if spec.kind is TaskKind.SEGMENTATION:
        return functools.partial(dice_ce_loss, reduction="none")
    return functools.partial(F.cross_entropy, reduction="none")


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _write_vector(params: list[torch.nn.Parameter], vector: np.ndarray) -> None:
    """Copy ``vector`` into ``params`` in place (the Parameter objects and their storage stay)."""
    count = sum(p.numel() for p in params)
    flat = np.asarray(vector)
    if flat.ndim != 1 or flat.shape[0] != count:
        raise ConfigError(f"the parameter vector has shape {flat.shape}, but the model has {count} trainable "
                          f"parameters: expected shape ({count},); the model config must be the same everywhere")
    if not np.issubdtype(flat.dtype, np.number) or not np.all(np.isfinite(flat)):
        raise ConfigError("the parameter vector holds NaN, infinite or non-numeric values; the global model "
                          "diverged: lower the learning rate or the update clip")
    source = torch.from_numpy(np.array(flat, dtype=np.float32))  # a writable copy (messages are read-only)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(source[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def _read_vector(params: list[torch.nn.Parameter]) -> np.ndarray:
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in params]) if params else torch.zeros(0)
    return flat.numpy().astype(np.float32, copy=True)


def _tensors(data: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.tensor(np.ascontiguousarray(data.inputs, dtype=np.float32))
    targets = torch.tensor(np.ascontiguousarray(data.targets, dtype=np.int64))
    return inputs, targets


def _data_problems(spec: TaskSpec, data: ArrayDataset, what: str) -> list[str]:
    problems = []
    if len(data) == 0:
        return [f"the {what} split is empty; every site needs samples"]
    if tuple(data.inputs.shape[1:]) != tuple(spec.input_shape):
        problems.append(f"the {what} inputs have sample shape {tuple(data.inputs.shape[1:])}, but the task's "
                        f"input shape is {tuple(spec.input_shape)}")
    wanted = (1, *spec.input_shape[1:]) if spec.kind is TaskKind.SEGMENTATION else ()
    if tuple(data.targets.shape[1:]) != wanted:
        problems.append(f"the {what} targets have sample shape {tuple(data.targets.shape[1:])}, but a "
                        f"{spec.kind.value} task needs {wanted}")
    if data.targets.size and (data.targets.min() < 0 or data.targets.max() >= spec.num_classes):
        problems.append(f"the {what} targets hold class ids in [{data.targets.min()}, {data.targets.max()}], "
                        f"outside [0, {spec.num_classes - 1}] for num_classes={spec.num_classes}")
    return problems


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    return resolve_device(device)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, spec: TaskSpec, vector: np.ndarray, data: ArrayDataset, *,
                   device: str | torch.device) -> dict[str, float]:
    """Metrics of ``model`` with parameters ``vector`` on ``data`` (in eval mode, batches of 64).

    Classification: ``accuracy`` and the mean cross-entropy ``loss``. Segmentation: ``dice``, the
    mean over samples of the foreground Dice (arg-max prediction; classes 1..C-1 averaged; a
    class absent from both prediction and label scores 1) and the mean ``(Dice + CE) / 2`` loss.
    ``vector`` is written into the model in place; its training mode is restored afterwards.
    """
    problems = _data_problems(spec, data, "evaluation")
    if problems:
        raise ConfigError(problems)
    target_device = _device(device)
    model.to(target_device)
    _write_vector(_trainable(model), vector)
    inputs, targets = _tensors(data)
    segmentation = spec.kind is TaskKind.SEGMENTATION
    loss_fn = _per_sample_loss(spec)
    was_training = model.training
    model.eval()
    loss_sum, score_sum = 0.0, 0.0
    try:
        for start in range(0, len(data), EVALUATION_BATCH):
            x = inputs[start:start + EVALUATION_BATCH].to(target_device)
            y = targets[start:start + EVALUATION_BATCH].to(target_device)
            outputs = model(x)
            loss_sum += float(loss_fn(outputs, y).sum())
            if segmentation:
                score_sum += float(dice_score(outputs, y).sum())
            else:
                score_sum += float((outputs.argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    n = len(data)
    return {"dice" if segmentation else "accuracy": score_sum / n, "loss": loss_sum / n}


class LocalTrainer:
    """A site's model and training split, trained round after round from the global parameters.

    ``dp`` None trains without privacy (the plain baseline). With ``dp`` the trainer uses it as
    given except ``device``: a DPSGDConfig with ``device="auto"`` takes ``settings.device``; two
    different explicit devices are a ConfigError. ``seed`` is this site's own seed (sampling,
    noise and shuffling; simulation only) - derive it per site, or sites draw the same noise.
    """

    def __init__(self, *, model: torch.nn.Module, spec: TaskSpec, train: ArrayDataset,
                 settings: TrainingSettings, dp: DPSGDConfig | None, ledger: PrivacyLedger | None,
                 seed: int | None) -> None:
        problems = [] if isinstance(settings, TrainingSettings) else [
            f"settings must be TrainingSettings, got {type(settings).__name__}"]
        problems += _data_problems(spec, train, "training")
        if dp is not None and not isinstance(dp, DPSGDConfig):
            problems.append(f"dp must be a DPSGDConfig or None, got {type(dp).__name__}")
        if dp is None and ledger is not None:
            problems.append("a ledger was given without DP-SGD (dp=None): nothing would be charged to it; "
                            "enable privacy or pass ledger=None")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            problems.append(f"seed must be an int or None, got {seed!r}")
        if problems:
            raise ConfigError(problems)
        self.model, self.spec, self.settings, self.seed = model, spec, settings, seed
        self.examples = len(train)
        self._loss = _per_sample_loss(spec)
        self._inputs, self._targets = _tensors(train)
        self._private = None
        if dp is None:
            self.device = resolve_device(settings.device)
            model.to(self.device)
            self._optimizer = self._make_optimizer(_trainable(model))
        else:
            dp = self._with_device(dp)
            factory = self._make_optimizer
            self._private = make_private(model, factory, TensorDataset(self._inputs, self._targets),
                                         config=dp, ledger=ledger, seed=seed)
            self.device = self._private.device
            self._optimizer = self._private.optimizer
        self._params = _trainable(model)

    def _with_device(self, dp: DPSGDConfig) -> DPSGDConfig:
        wanted = self.settings.device
        if dp.device == wanted or wanted == "auto":
            return dp
        if dp.device != "auto":
            raise ConfigError(f"the DP-SGD config asks for device {dp.device!r} but the training settings for "
                              f"{wanted!r}; build both from the same [training] device")
        return dataclasses.replace(dp, device=wanted)

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        s = self.settings
        if s.optimizer is Optimizer.ADAM:
            return torch.optim.Adam(params, lr=s.learning_rate)
        return torch.optim.SGD(params, lr=s.learning_rate, momentum=s.momentum)

    # ----------------------------------------------------------------- parameters
    def parameter_count(self) -> int:
        """The number of trainable parameters (the length of every vector)."""
        return int(sum(p.numel() for p in self._params))

    def get_vector(self) -> np.ndarray:
        """A float32 copy of the trainable parameters, flattened in ``model.parameters()`` order."""
        return _read_vector(self._params)

    def set_vector(self, vector: np.ndarray) -> None:
        """Write ``vector`` into the trainable parameters in place."""
        _write_vector(self._params, vector)

    def epsilon(self) -> float | None:
        """The site's spend so far (the ledger's, when one is attached); None without DP."""
        return None if self._private is None else float(self._private.epsilon())

    # ----------------------------------------------------------------- rounds
    def train_round(self, global_vector: np.ndarray, *, round_id: str,
                    replay_charged: bool = False) -> LocalRoundResult:
        """Train one round from ``global_vector``; return ``local - global``.

        Under DP-SGD the round is charged to the ledger before any record is read
        (PrivacyBudgetExceeded refuses it untouched); ``replay_charged=True`` re-runs a round the
        ledger already charged (after a crash), drawing the same batches and noise. Without DP
        the same ``round_id`` always draws the same batches too.
        """
        self.set_vector(global_vector)
        start = self.get_vector()
        self._optimizer.state.clear()  # momentum / Adam moments start afresh from the global model
        if self._private is not None:
            report = self._private.train_round(self._loss, round_id=round_id, replay_charged=replay_charged)
            steps, mean_loss, epsilon = report.steps, report.mean_loss, report.epsilon
        else:
            try:
                steps, mean_loss = self._plain_round(str(round_id))
            except BaseException:
                self.set_vector(start)  # never leave a half-trained model behind
                raise
            epsilon = None
        update = self.get_vector() - start
        return LocalRoundResult(update=update.astype(np.float32, copy=False), examples=self.examples,
                                mean_loss=float(mean_loss), epsilon=epsilon, steps=int(steps))

    def _round_generator(self, round_id: str) -> torch.Generator:
        label = f"securefed/local-training/shuffle/round={round_id}"
        source = SystemRandom() if self.seed is None else SeededRandom(self.seed).fork(label)
        return torch.Generator().manual_seed(int.from_bytes(source.random_bytes(8), "little") >> 1)

    def _steps(self) -> int:
        s = self.settings
        if s.steps_per_round is not None:
            return s.steps_per_round
        epochs = 1.0 if s.epochs_per_round is None else s.epochs_per_round
        return max(1, round(epochs * self.examples / s.batch_size))

    def _plain_round(self, round_id: str) -> tuple[int, float]:
        generator = self._round_generator(round_id)
        n = self.examples
        batch = min(self.settings.batch_size, n)  # a site smaller than one batch trains on all it has
        chunk = self.settings.max_physical_batch_size or batch
        order, position = torch.randperm(n, generator=generator), 0
        loss_sum, seen = 0.0, 0
        self.model.train()
        steps = self._steps()
        for step in range(steps):
            if position + batch > n:  # a new pass over the data
                order, position = torch.randperm(n, generator=generator), 0
            indices = order[position:position + batch]
            position += batch
            self._optimizer.zero_grad(set_to_none=True)
            for part in indices.split(chunk):  # memory-sized chunks of one batch, gradients summed
                x = self._inputs[part].to(self.device)
                y = self._targets[part].to(self.device)
                losses = self._loss(self.model(x), y)
                total = float(losses.detach().sum())
                if not math.isfinite(total):
                    raise ConfigError(f"the training loss of round {round_id!r} became {total} at step {step + 1}; "
                                      "lower the learning rate (the model was reset to the global one)")
                (losses.sum() / len(indices)).backward()
                loss_sum, seen = loss_sum + total, seen + len(part)
            self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return steps, loss_sum / seen if seen else math.nan

    def evaluate(self, vector: np.ndarray, data: ArrayDataset) -> dict[str, float]:
        """Metrics of the model with parameters ``vector`` on ``data`` (see :func:`evaluate_model`)."""
        return evaluate_model(self.model, self.spec, vector, data, device=self.device)

    def close(self) -> None:
        """Release DP-SGD's hooks on the model (no more rounds after this)."""
        if self._private is not None:
            self._private.close()
