"""DP-SGD at one site, persistent across federated rounds: the Opacus adapter.

:func:`make_private` turns a model, an optimizer and a dataset into a :class:`PrivateTraining`
whose :meth:`~PrivateTraining.train_round` runs one federated round of DP-SGD (Abadi et al. 2016):
Poisson sampling at rate q = batch_size / n, per-example clipping to ``max_grad_norm``, Gaussian
noise N(0, (z C)^2) on the clipped sum, division by the expected batch size.

Composition across rounds. One training object lives as long as the site's federation; its
:meth:`~PrivateTraining.epsilon` composes ALL rounds so far (from the ledger, the source of truth,
when one is attached). A fresh Opacus ``PrivacyEngine`` per round, as Flower's Opacus example
has, reports the last round alone. Opacus gives per-sample gradients, clipping, noise and
physical batching only; its accountant is never created.

Charge first. ``train_round`` charges the round's :class:`PoissonSampledGaussian` event (to the
ledger, and against ``target_epsilon`` for a calibrated training) BEFORE the first record is read,
so a refused round touches no data. A round that fails after it started keeps its charge (never
under-count), and the model is restored to its start-of-round parameters; retry under a new id.

Losses. ``loss_fn(outputs, targets)`` returns per-example losses of shape (B,) (e.g.
``nn.CrossEntropyLoss(reduction="none")`` or :mod:`securefed.privacy.losses`), or the batch MEAN
as a scalar, which only Opacus' per-sample hooks accept (they undo a mean, not a sum). **The loss
of record i must depend on record i alone**: a batch statistic inside the loss (MONAI
``DiceLoss(batch=True)``, a batch mean, contrastive terms) lets one record move every other
record's clipped gradient, and no clipping bounds that. Each round probes the loss once, on its
first batch of two or more records, and refuses a coupled one (:mod:`.dpsgd_checks`); the probe
catches the usual couplings, not every possible one.

Clipping modes (:class:`~securefed.privacy.dpsgd_config.ClippingMode`): PER_SAMPLE uses Opacus'
hooks, GHOST Opacus' fast gradient clipping (Li et al. 2022; Bu et al. 2022), FAST securefed's
book-keeping engine (Bu et al. 2023) feeding Opacus' ``DPOptimizerFastGradientClipping`` (which
adds the noise to the clipped sum the engine leaves in ``p.grad``). AUTO picks FAST when the
engine supports every trainable layer (no weight tying, no reparametrised weights) and the
training is not distributed, else PER_SAMPLE. GHOST has preconditions its hooks cannot check:
every trainable parameter is used only inside its own layer's forward (no parent calling
``F.linear`` on a child's weight), each layer runs once per forward, one row per record reaches
every layer, and the loss is separable. So each step first counts every standard layer
parameter's uses in the autograd graph against the hooked calls, and checks row counts and the
triangle bound ``||sum_i c_i g_i|| <= sum_i c_i ||g_i||`` (:mod:`.dpsgd_checks`); a failure
refuses the step (round charged, model restored). ``example_input=`` finds most of this first.

State. Gradients, Opacus' per-sample state and recorded activations are cleared before and
after every round (a non-private backward outside a round never enters a released step), and the
optimizer must hold every trainable parameter.

Physical batches. With ``max_physical_batch_size`` Opacus' ``BatchMemoryManager`` splits each
Poisson batch into chunks; the optimizer still steps once per logical batch.

Devices. ``device="auto"`` trains on CUDA when available. Several GPUs at one site: launch one
process per GPU, ``torchrun --nproc_per_node=K train.py``, call
``torch.distributed.init_process_group("nccl")`` in each, and pass ``distributed=True`` in the
config. Every process then samples its own shard of the records at rate q (together one Poisson
sample of the whole dataset), the parameters are synchronised by Opacus' DPDDP, the clipped sums
are all-reduced and rank 0 alone adds the noise. Only rank 0 charges its ledger; the others learn
the outcome by broadcast and pass ``ledger=None``. Before each noised step the ranks agree that
all of them got there; when one fails, every rank raises.

Ledger and target. With a ledger, ``target_epsilon`` is checked against the ledger's DP-SGD
charges (record-level Poisson-sampled Gaussian events) plus this round, as well as against this
object's own rounds, so a fresh object after a restart cannot overspend the target even without
:meth:`~PrivateTraining.load_state_dict`; a round id the ledger already has a DP-SGD charge for
is refused.

Randomness. Without ``seed`` the sampling and noise generators are seeded per round from the
operating system: torch's default generator starts from a fixed seed in every process, which would
make the "random" batches and noise predictable. torch's generators are not cryptographically
secure and its float Gaussian is open to the floating-point attack of Mironov (2012); Opacus'
``secure_mode`` (torchcsprng) is not used. ``seed`` makes runs reproducible, for simulation only:
never use it with real data. Its streams are labelled with the round id and the ledger sequence
number of the round's charge, so with a ledger a restart never replays a round's noise (without
one the label is the round's index in this training, repeated by a retry after a crash).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample import AbstractGradSampleHooks, prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, PrivacyBudgetExceeded, PrivacyError
from ..primitives.randomness import SeededRandom, SystemRandom
from . import dpsgd_checks as checks, dpsgd_ledger
from .accounting import compose_epsilon
from .dpsgd_config import (ClippingMode, DPSGDConfig, RoundReport, TrainingPlan, plan_training, restore_rounds,
                           training_state)
from .dpsgd_data import PoissonData, as_pair, leading_size, resolve_device, to_device
from .events import PoissonSampledGaussian

if TYPE_CHECKING:
    from .ledger import PrivacyLedger

__all__ = ["make_private", "PrivateTraining"]

_NOTE = "dp-sgd"
_OWNED = "_securefed_private_training"  # marks a model that a PrivateTraining holds
_OPACUS_MODE = {ClippingMode.PER_SAMPLE: "hooks", ClippingMode.GHOST: "ghost", ClippingMode.FAST: "ghost"}
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class PrivateTraining:
    """A site's DP-SGD training across federated rounds; build it with :func:`make_private`.

    ``model`` is the caller's own module (parameters on ``device``; its state_dict keys are
    unchanged), ``optimizer`` the caller's optimizer (Opacus wraps it internally),
    ``noise_multiplier``, ``sample_rate`` and ``steps_per_round`` the plan every round runs.
    """

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: PoissonData,
                 plan: TrainingPlan, config: DPSGDConfig, device: torch.device,
                 clipping: ClippingMode, clipper: Any, ledger: PrivacyLedger | None,
                 seed: int | bytes | str | None) -> None:
        self.model, self.optimizer, self.device, self.plan = model, optimizer, device, plan
        self.config, self.clipping, self.ledger = config, clipping, ledger
        self.noise_multiplier, self.sample_rate = plan.noise_multiplier, plan.sample_rate
        self.steps_per_round = plan.steps_per_round
        self._data, self._seed = data, seed
        self._distributed = config.distributed
        self._rank = torch.distributed.get_rank() if self._distributed else 0
        self._world = torch.distributed.get_world_size() if self._distributed else 1
        self._ddp = DPDDP(model) if self._distributed else None  # broadcasts rank 0's parameters
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._trainable = [p for _, p in self._named]
        self._rounds: list[tuple[str, PoissonSampledGaussian]] = []
        self._steps_taken = 0
        self._loss_probed = False
        self._clipper = clipper  # securefed's BookKeepingClipper under FAST
        self._hooks = self._make_hooks()
        self._dp_optimizer = self._make_dp_optimizer()
        setattr(model, _OWNED, True)

    # ----------------------------------------------------------------- public surface
    @property
    def rounds(self) -> tuple[str, ...]:
        """The ids of the rounds this training has charged, oldest first."""
        return tuple(round_id for round_id, _ in self._rounds)

    @property
    def events(self) -> tuple[PoissonSampledGaussian, ...]:
        """The privacy events of this training's rounds (one per round)."""
        return tuple(event for _, event in self._rounds)

    @property
    def data_loader(self) -> DataLoader:
        """A Poisson-sampled loader like a round's (fresh randomness; iterating it charges nothing)."""
        return self._loader(torch.Generator().manual_seed(self._seed_for("inspect", "-", "-")))

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon after all rounds so far at ``delta`` (default: the config's delta).

        With a ledger this is the ledger's composition of every event it holds (the site's whole
        spend, which includes any other mechanism charged there); otherwise this training's rounds.
        """
        delta = self.plan.delta if delta is None else delta
        if self.ledger is not None and self._rank == 0:
            if delta == self.ledger.budget.delta:
                return float(self.ledger.spent().epsilon)
            return compose_epsilon(self.ledger.events(), delta=delta, accountant=self.ledger.accountant)
        return compose_epsilon(self.events, delta=delta, accountant=self.plan.accountant)

    def train_round(self, loss_fn: Callable[[Any, Any], torch.Tensor], *, round_id: str | int,
                    unpack_batch: Callable[[Any], tuple[Any, Any]] | None = None,
                    replay_charged: bool = False) -> RoundReport:
        """Charge one round, then run its ``steps_per_round`` DP-SGD steps.

        Raises PrivacyBudgetExceeded before any record is read when the round would exceed the
        ledger's budget or the calibrated ``target_epsilon``; ConfigError for a reused
        ``round_id``, a loss of the wrong shape or one that couples records, or a model whose
        per-sample gradients do not have one row per record; PrivacyError for a NaN/inf loss or
        update, or a clipped sum longer than its per-sample norms allow. A round that fails after
        its charge keeps it, and the model is restored to the start of the round.

        ``replay_charged=True`` (resuming after a crash) reuses the ledger's charge for ``round_id``
        (see :func:`~securefed.privacy.dpsgd_ledger.replayable_charge`).
        """
        if self._hooks is None and self._clipper is None:
            raise ConfigError("this PrivateTraining was closed; it can train no more rounds")
        if isinstance(round_id, bool) or not isinstance(round_id, (str, int)) or str(round_id) == "":
            raise ConfigError(f"round_id must be a non-empty str or an int, got {round_id!r}")
        key = str(round_id)
        if key in self.rounds:
            raise ConfigError(f"round {key!r} was already charged by this training; every round needs a "
                              "new round_id (a failed round keeps its charge: retry it under a new id)")
        event = self.plan.round_event()
        entry = None
        if replay_charged and self.ledger is not None and not self._distributed:
            entry = dpsgd_ledger.replayable_charge(self.ledger, event, key, seeded=self._seed is not None)
        if entry is None:
            entry = self._charge(event, key)
        serial = f"seq={entry.seq}" if entry is not None else f"index={len(self._rounds)}"
        self._rounds.append((key, event))
        snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            steps, batches, loss_sum, seen = self._run(loss_fn, key, serial, unpack_batch or as_pair)
        except BaseException:
            self.model.load_state_dict(snapshot)
            self._reset_gradients()
            raise
        finally:
            checks.clear_training_state(self.model)  # nothing of the round stays on the model
        if steps != event.steps:
            raise PrivacyError(f"round {key!r} ran {steps} optimizer steps but charged {event.steps}")
        return RoundReport(round_id=key, steps=steps, physical_batches=batches, event=event,
                           epsilon=self.epsilon(), delta=self.plan.delta,
                           mean_loss=loss_sum / seen if seen else math.nan, ledger_entry=entry)

    def state_dict(self) -> dict[str, Any]:
        """This training's plan and charged rounds, as plain JSON types: save it after every round and
        pass it to :meth:`load_state_dict` after a restart (model and optimizer state are yours to save)."""
        return training_state(self.plan, self._rounds)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the composition saved by :meth:`state_dict` (only before the first round)."""
        if self._rounds:
            raise ConfigError("load_state_dict must come before the first train_round of this object")
        self._rounds = restore_rounds(state, self.plan)

    def close(self) -> None:
        """Remove the per-sample gradient hooks and marks, leaving a plain model (no more rounds)."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
        if self._clipper is not None:
            self._clipper.remove()
            self._clipper = None
        checks.clear_training_state(self.model)
        for p in self._trainable:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
        if hasattr(self.model, _OWNED):
            delattr(self.model, _OWNED)

    # ----------------------------------------------------------------- charging
    def _charge(self, event: PoissonSampledGaussian, key: str) -> Any:
        if not self._distributed:
            return self._charge_here(event, key)
        outcome: list[Any] = [None, None]
        failure: BaseException | None = None
        if self._rank == 0:
            try:
                outcome = [None, self._charge_here(event, key)]
            except Exception as exc:  # every rank must learn the outcome, or the others hang
                failure = exc
                outcome = ["budget" if isinstance(exc, PrivacyBudgetExceeded) else "error", str(exc)]
        torch.distributed.broadcast_object_list(outcome, src=0)
        if failure is not None:
            raise failure
        if outcome[0] == "budget":
            raise PrivacyBudgetExceeded(outcome[1])
        if outcome[0] == "error":
            raise PrivacyError(f"rank 0 could not charge round {key!r}: {outcome[1]}")
        return outcome[1]

    def _charge_here(self, event: PoissonSampledGaussian, key: str) -> Any:
        if self.ledger is not None and key in dpsgd_ledger.dp_sgd_round_ids(self.ledger):
            raise ConfigError(f"the ledger already holds a DP-SGD charge for round {key!r} (from this or an "
                              "earlier run); every round needs a new round_id")
        if self.plan.calibrated:
            # This object's rounds, and the ledger's DP-SGD charges: a fresh object after a restart
            # (without load_state_dict) still sees what the ledger holds.
            histories = [list(self.events)]
            if self.ledger is not None:
                histories.append(dpsgd_ledger.dp_sgd_events(self.ledger))
            target = float(self.config.target_epsilon)
            after = max(compose_epsilon([*history, event], delta=self.plan.delta, accountant=self.plan.accountant)
                        for history in histories)
            if after > target:
                raise PrivacyBudgetExceeded(
                    f"round {key!r} would make the DP-SGD epsilon {after:.4g} > target_epsilon {target:g} "
                    f"(delta={self.plan.delta:g}; this training's rounds and the ledger's DP-SGD charges "
                    f"count), which was calibrated for planned_rounds={self.plan.planned_rounds}; "
                    f"{max(len(h) for h in histories)} rounds are done. Stop here, or plan more rounds "
                    "from the start (more noise per round)")
        if self.ledger is None:
            return None
        note = f"{_NOTE}: {event.steps} steps, q={event.sample_rate:.6g}, z={event.noise_multiplier:.6g}"
        return self.ledger.charge(event, round_id=key, note=note)

    # ----------------------------------------------------------------- training
    def _seed_for(self, purpose: str, key: str, serial: str) -> int:
        label = f"securefed/dpsgd/{purpose}/round={key}/{serial}/rank={self._rank}"
        source = SystemRandom() if self._seed is None else SeededRandom(self._seed).fork(label)
        return int.from_bytes(source.random_bytes(8), "little") >> 1

    def _loader(self, generator: torch.Generator) -> DataLoader:
        return self._data.loader(sample_rate=self.sample_rate, steps=self.steps_per_round, generator=generator,
                                 rank=self._rank, world_size=self._world)

    def _make_dp_optimizer(self) -> DPOptimizer:
        mode = _OPACUS_MODE[self.clipping]
        cls = get_optimizer_class(clipping="flat", distributed=self._distributed, grad_sample_mode=mode)
        dp = cls(self.optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=float(self.config.max_grad_norm),
                 expected_batch_size=self.plan.batch_size / self._world, loss_reduction="mean")
        dp.attach_step_hook(self._count_step)  # called once per noised (logical) step
        return dp

    def _make_hooks(self) -> AbstractGradSampleHooks | None:
        if self.clipping is ClippingMode.FAST:
            return None
        extra = {"max_grad_norm": float(self.config.max_grad_norm)} if self.clipping is ClippingMode.GHOST else {}
        return prepare_module(self.model, grad_sample_mode=_OPACUS_MODE[self.clipping], wrap_model=False,
                              batch_first=True, loss_reduction="mean", **extra)

    def _count_step(self, _optimizer: DPOptimizer) -> None:
        self._steps_taken += 1

    def _reset_gradients(self) -> None:
        # A failed round may leave partial sums, queued split signals, disabled hooks and, after
        # a forward with no backward, recorded activations and forward counters: start over clean.
        checks.clear_training_state(self.model)
        if self._clipper is not None:
            self._clipper.clear()
        if self._hooks is not None:  # they may have been left disabled
            self._hooks.cleanup()
            self._hooks = self._make_hooks()
        self._dp_optimizer = self._make_dp_optimizer()

    @contextmanager
    def _physical_batches(self, loader: DataLoader) -> Iterator[DataLoader]:
        limit = self.config.max_physical_batch_size
        if limit is None:
            yield loader
        else:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=limit,
                                    optimizer=self._dp_optimizer) as split:
                yield split

    def _run(self, loss_fn: Callable[[Any, Any], torch.Tensor], key: str, serial: str,
             unpack: Callable[[Any], tuple[Any, Any]]) -> tuple[int, int, float, int]:
        self._dp_optimizer.generator = torch.Generator(device=self.device).manual_seed(
            self._seed_for("noise", key, serial))
        loader = self._loader(torch.Generator().manual_seed(self._seed_for("sampling", key, serial)))
        checks.clear_training_state(self.model)  # whatever ran outside a round stays out of it
        if self._clipper is not None:
            self._clipper.clear()
        self.model.train()
        self._loss_probed = False
        start, batches, loss_sum, seen = self._steps_taken, 0, 0.0, 0
        failure: BaseException | None = None  # distributed: held until the ranks agree
        with self._physical_batches(loader) as physical:
            for batch in physical:
                batches += 1
                stepping = not self._dp_optimizer._check_skip_next_step(pop_next=False)
                if failure is None:
                    try:
                        total, size = self._process(batch, loss_fn, key, unpack)
                        loss_sum, seen = loss_sum + total, seen + size
                    except Exception as exc:
                        if not self._distributed:
                            raise
                        failure = exc
                if self._distributed and stepping:
                    checks.ranks_agree(failure, key=key, device=self.device)
                if failure is not None:  # a failed rank walks on to the next noised step, then raises
                    self._dp_optimizer._check_skip_next_step(pop_next=True)
                    continue
                before = self._steps_taken
                self._dp_optimizer.step()
                self._dp_optimizer.zero_grad(set_to_none=True)
                if self._steps_taken != before:
                    checks.check_finite_parameters(self._trainable, key=key, step=self._steps_taken - start)
        return self._steps_taken - start, batches, loss_sum, seen

    def _process(self, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor], key: str,
                 unpack: Callable[[Any], tuple[Any, Any]]) -> tuple[float, int]:
        size = leading_size(batch)
        if size == 0:
            self._empty_backward()
            return 0.0, 0
        inputs, targets = unpack(to_device(batch, self.device))
        try:
            outputs = (self._ddp if self._ddp is not None else self.model)(inputs)
        except NotImplementedError as exc:  # Opacus' ghost hooks refuse a layer that runs twice
            if self.clipping is not ClippingMode.GHOST:
                raise
            raise ConfigError(f"clipping='ghost' cannot train this model ({exc}): a layer runs more than once "
                              "per forward pass or shares its parameter; use clipping='fast' or 'per-sample' "
                              f"(the model was restored and round {key!r} keeps its charge)") from exc
        return self._backward(loss_fn(outputs, targets), loss_fn, outputs, targets, size, key), size

    def _backward(self, losses: object, loss_fn: Callable[[Any, Any], Any], outputs: Any, targets: Any,
                  size: int, key: str) -> float:
        per_sample = isinstance(losses, torch.Tensor) and losses.shape == (size,)
        scalar = isinstance(losses, torch.Tensor) and losses.dim() == 0
        if not (per_sample or scalar):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ConfigError(f"loss_fn must return per-example losses of shape ({size},) or their mean as "
                              f"a scalar, got {shape}; use reduction='none' and average over the other "
                              f"dimensions (round {key!r} keeps its charge)")
        if scalar and self.clipping is not ClippingMode.PER_SAMPLE:
            raise ConfigError(f"clipping={self.clipping.value!r} needs per-example losses of shape ({size},), "
                              "got a scalar: use reduction='none' in loss_fn, or clipping='per-sample' "
                              f"(round {key!r} keeps its charge)")
        total = float(losses.detach().sum()) * (size if scalar else 1)
        if not math.isfinite(total):
            raise PrivacyError(f"the loss of round {key!r} is {total} (NaN or infinite): check the inputs "
                               "for NaN/inf and lower the learning rate; the model was restored to the start "
                               "of the round and the round keeps its charge, so retry under a new round_id")
        if not self._loss_probed and size >= 2:  # once per round, before anything is released
            checks.check_losses_separable(loss_fn, outputs, targets, losses, size=size, key=key)
            self._loss_probed = True
        bound = float(self.config.max_grad_norm)
        with warnings.catch_warnings():
            # Opacus' hooks fire on module outputs when the input needs no gradient, as intended.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            if self.clipping is ClippingMode.PER_SAMPLE:
                (losses.mean() if per_sample else losses).backward()
                checks.per_sample_rows(self._named, size, key)
                return total
            if self.clipping is ClippingMode.GHOST:
                norms, coefficients = checks.ghost_backward(self._hooks, self._named, losses,
                                                            max_grad_norm=bound, key=key)
            else:
                norms = self._clipper.backward(losses)
                coefficients = (bound / norms).clamp(max=1.0)  # as the engine clipped
        checks.check_release_bound(self._named, norms, coefficients, max_grad_norm=bound, key=key)
        return total

    def _empty_backward(self) -> None:
        # An empty Poisson batch still takes a noise-only step; skipping it would leak emptiness.
        for p in self._trainable:
            if self.clipping is ClippingMode.PER_SAMPLE:
                p.grad_sample = p.new_zeros((0, *p.shape))
            elif p.grad is None:
                p.grad = torch.zeros_like(p)


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer | OptimizerFactory,
                 data: Dataset | DataLoader, *, config: DPSGDConfig, ledger: PrivacyLedger | None = None,
                 seed: int | bytes | str | None = None, example_input: torch.Tensor | None = None
                 ) -> PrivateTraining:
    """Make a site's model, optimizer and data private for DP-SGD across federated rounds.

    ``optimizer`` is an optimizer over ALL the model's trainable parameters (freeze the others with
    ``requires_grad_(False)``) or a factory called with the trainable parameters once the model is
    on its device. ``data`` is a map-style Dataset or a DataLoader over one (its collate function,
    workers and pinning are kept; its batch size, sampler and shuffling are replaced by Poisson
    sampling at ``config.batch_size``). ``ledger`` is a
    :class:`~securefed.privacy.ledger.PrivacyLedger` charged before every round; its budget delta
    must equal ``config.delta``. ``seed`` makes sampling and noise reproducible (simulation only).
    ``example_input``, a batch of at least two inputs, runs a trial step on a copy of the model
    (:func:`~securefed.privacy.model_compat.check_dp_compatible`; for GHOST also a count of layer
    calls) so that a model DP-SGD cannot clip correctly is refused before anything is charged.
    Every problem with the arguments is reported in one ConfigError. The model's gradients are
    cleared.
    """
    problems: list[str] = []
    if not isinstance(config, DPSGDConfig):
        raise ConfigError(f"config must be a DPSGDConfig, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module):
        problems.append(f"model must be a torch.nn.Module, got {type(model).__name__}")
    elif getattr(model, _OWNED, False):
        problems.append("this model already belongs to a PrivateTraining: keep that one object for every "
                        "round (a new one per round would restart the privacy composition), or close() it first")
    elif any(isinstance(m, AbstractGradSampleHooks) for m in model.modules()) or any(
            hasattr(p, "grad_sample") for p in model.parameters()):
        problems.append("the model is already wrapped for per-sample gradients; pass the plain model")
    poisson_data = None
    try:
        poisson_data = PoissonData(data)
    except ConfigError as exc:
        problems.extend(exc.problems)
    opt = checks.optimizer_for(model, optimizer, problems) if isinstance(model, torch.nn.Module) else None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, bytes, str))):
        problems.append(f"seed must be None, an int, bytes or a str, got {type(seed).__name__}")
    problems.extend(checks.ledger_problems(ledger, config) if ledger is not None else [])
    if config.distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        problems.append("distributed=True needs torch.distributed initialised: launch with torchrun "
                        "--nproc_per_node=K and call torch.distributed.init_process_group first")
    plan = None
    if poisson_data is not None:
        try:
            plan = plan_training(config, dataset_size=len(poisson_data))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if isinstance(model, torch.nn.Module):
        ghost = config.clipping is ClippingMode.GHOST
        problems.extend(checks.model_problems(model, ghost=ghost, example_input=example_input))
    try:
        device = resolve_device(config.device, distributed=config.distributed)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    model.to(device)
    if not isinstance(opt, torch.optim.Optimizer):
        opt = checks.optimizer_from_factory(model, opt)
    checks.clear_training_state(model)  # a non-private backward before this call must not leak
    clipping, clipper = checks.choose_clipping(model, config)
    return PrivateTraining(model=model, optimizer=opt, data=poisson_data, plan=plan,
                           config=config, device=device, clipping=clipping, clipper=clipper, ledger=ledger, seed=seed)
