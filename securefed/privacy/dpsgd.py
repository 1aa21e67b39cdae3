"""DP-SGD at one site, persistent across federated rounds: the Opacus adapter.

:func:`make_private` turns a model, an optimizer and a dataset into a :class:`PrivateTraining`
whose :meth:`~PrivateTraining.train_round` runs one federated round of DP-SGD (Abadi et al. 2016):
Poisson sampling at rate q = batch_size / n, per-example clipping to ``max_grad_norm``, Gaussian
noise N(0, (z C)^2) on the clipped sum, division by the expected batch size.

Composition across rounds. One training object lives as long as the site's federation: round r
is charged with its own ``steps_per_round`` steps, and :meth:`~PrivateTraining.epsilon` composes
the events of ALL rounds so far (from the ledger when one is attached, which is then the source of
truth, else from this object's history, which :meth:`~PrivateTraining.state_dict` carries over a
process restart). Building a fresh Opacus ``PrivacyEngine`` every round, as Flower's Opacus
example does, reports the epsilon of the last round alone. We use Opacus for per-sample gradients,
clipping, noise and physical batching only; its accountant is never created.

Charge first. ``train_round`` charges the round's :class:`PoissonSampledGaussian` event (to the
ledger, and against ``target_epsilon`` for a calibrated training) BEFORE the first record is read,
so a refused round touches no data. A round that fails after it started keeps its charge (the data
was touched: never under-count), and the model is restored to its start-of-round parameters so a
half-trained or NaN model is never shared. A failed round is retried under a new ``round_id``.

Losses. ``loss_fn(outputs, targets)`` returns per-example losses of shape (B,) (e.g.
``nn.CrossEntropyLoss(reduction="none")`` or :mod:`securefed.privacy.losses`), or the batch MEAN
as a scalar, which only Opacus' per-sample hooks accept (they undo a mean, not a sum).

Clipping modes (:class:`~securefed.privacy.dpsgd_config.ClippingMode`): PER_SAMPLE uses Opacus'
hooks, GHOST Opacus' fast gradient clipping (Li et al. 2022; Bu et al. 2022), FAST securefed's
book-keeping engine (Bu et al. 2023) feeding Opacus' ``DPOptimizerFastGradientClipping`` (which
adds the noise to the clipped sum the engine leaves in ``p.grad``). AUTO picks FAST when the
engine supports every trainable layer and the training is not distributed, else PER_SAMPLE.

Physical batches. With ``max_physical_batch_size`` Opacus' ``BatchMemoryManager`` splits each
Poisson batch into chunks; the optimizer still steps once per logical batch.

Devices. ``device="auto"`` trains on CUDA when available. Several GPUs at one site: launch one
process per GPU, ``torchrun --nproc_per_node=K train.py``, call
``torch.distributed.init_process_group("nccl")`` in each, and pass ``distributed=True`` in the
config. Every process then samples its own shard of the records at rate q (together one Poisson
sample of the whole dataset), the parameters are synchronised by Opacus' DPDDP, the clipped sums
are all-reduced and rank 0 alone adds the noise. Only rank 0 charges its ledger; the others learn
the outcome by broadcast and pass ``ledger=None``.

Randomness. Without ``seed`` the sampling and noise generators are seeded per round from the
operating system: torch's default generator starts from a fixed seed in every process, which would
make the "random" batches and noise predictable. torch's generators are not cryptographically
secure and its float Gaussian is open to the floating-point attack of Mironov (2012); Opacus'
``secure_mode`` (torchcsprng) is not used. ``seed`` makes runs reproducible, for simulation only.
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
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, PrivacyBudgetExceeded, PrivacyError
from ..primitives.randomness import SeededRandom, SystemRandom
from .accounting import compose_epsilon
from .dpsgd_config import ClippingMode, DPSGDConfig, RoundReport, TrainingPlan, plan_training
from .dpsgd_data import PoissonData, as_pair, leading_size, resolve_device, to_device
from .events import PoissonSampledGaussian, event_from_record
from .fast_clipping import BookKeepingClipper
from .model_compat import require_dp_compatible

if TYPE_CHECKING:
    from .ledger import PrivacyLedger

__all__ = ["make_private", "PrivateTraining"]

_STATE_FORMAT = "securefed-dpsgd-state"
_STATE_VERSION = 1
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
                 clipping: ClippingMode, clipper: BookKeepingClipper | None, ledger: PrivacyLedger | None,
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
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._rounds: list[tuple[str, PoissonSampledGaussian]] = []
        self._steps_taken = 0
        self._clipper: BookKeepingClipper | None = clipper
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
        """A Poisson-sampled loader like the one a round uses (fresh randomness; for inspection:
        iterating it yourself trains without charging anything)."""
        return self._loader(torch.Generator().manual_seed(self._seed_for("inspect", "-")))

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
                    unpack_batch: Callable[[Any], tuple[Any, Any]] | None = None) -> RoundReport:
        """Charge one round, then run its ``steps_per_round`` DP-SGD steps.

        Raises PrivacyBudgetExceeded before any record is read when the round would exceed the
        ledger's budget or the calibrated ``target_epsilon``; ConfigError for a reused
        ``round_id`` or a loss of the wrong shape; PrivacyError for a NaN/inf loss or update.
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
        entry = self._charge(event, key)
        self._rounds.append((key, event))
        snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            steps, batches, loss_sum, seen = self._run(loss_fn, key, unpack_batch or as_pair)
        except BaseException:
            self.model.load_state_dict(snapshot)
            self._reset_gradients()
            raise
        if steps != event.steps:
            raise PrivacyError(f"round {key!r} ran {steps} optimizer steps but charged {event.steps}")
        return RoundReport(round_id=key, steps=steps, physical_batches=batches, event=event,
                           epsilon=self.epsilon(), delta=self.plan.delta,
                           mean_loss=loss_sum / seen if seen else math.nan, ledger_entry=entry)

    def state_dict(self) -> dict[str, Any]:
        """This training's plan and charged rounds, as plain JSON types.

        Save it after every round and pass it to :meth:`load_state_dict` after a restart so the
        next round composes with the earlier ones. (Model and optimizer state are yours to save.)
        """
        return {"format": _STATE_FORMAT, "version": _STATE_VERSION, "plan": self._plan_record(),
                "rounds": [{"round_id": key, "event": event.to_record()} for key, event in self._rounds]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the composition saved by :meth:`state_dict` (only before the first round)."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ConfigError("not a securefed DP-SGD state: pass what PrivateTraining.state_dict() returned")
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"unsupported DP-SGD state version {state.get('version')!r}; "
                              f"this securefed reads version {_STATE_VERSION}")
        if self._rounds:
            raise ConfigError("load_state_dict must come before the first train_round of this object")
        saved, current = state.get("plan"), self._plan_record()
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
        self._rounds = restored

    def close(self) -> None:
        """Remove the per-sample gradient hooks and marks, leaving a plain model (no more rounds)."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
        if self._clipper is not None:
            self._clipper.remove()
            self._clipper = None
        for p in self._trainable:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
        if hasattr(self.model, _OWNED):
            delattr(self.model, _OWNED)

    # ----------------------------------------------------------------- charging
    def _plan_record(self) -> dict[str, Any]:
        p = self.plan
        return {"dataset_size": p.dataset_size, "batch_size": p.batch_size, "sample_rate": p.sample_rate,
                "steps_per_round": p.steps_per_round, "noise_multiplier": p.noise_multiplier}

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
        if self.plan.calibrated:
            target = float(self.config.target_epsilon)
            after = compose_epsilon([*self.events, event], delta=self.plan.delta, accountant=self.plan.accountant)
            if after > target:
                raise PrivacyBudgetExceeded(
                    f"round {key!r} would make this training's epsilon {after:.4g} > target_epsilon "
                    f"{target:g} (delta={self.plan.delta:g}), which was calibrated for planned_rounds="
                    f"{self.plan.planned_rounds}; {len(self._rounds)} rounds are done. Stop here, or plan "
                    "more rounds from the start (more noise per round)")
        if self.ledger is None:
            return None
        note = f"{_NOTE}: {event.steps} steps, q={event.sample_rate:.6g}, z={event.noise_multiplier:.6g}"
        return self.ledger.charge(event, round_id=key, note=note)

    # ----------------------------------------------------------------- training
    def _seed_for(self, purpose: str, key: str) -> int:
        label = f"securefed/dpsgd/{purpose}/round={key}/rank={self._rank}"
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
        # A failed round may leave partial sums, queued split signals and, after a forward with no
        # backward, Opacus' stored activations and forward counters: start over clean.
        for p in self._trainable:
            p.grad, p.summed_grad = None, None
        if self._clipper is not None:
            self._clipper.clear()
        if self._hooks is not None:
            self._hooks.cleanup()
            for module in self.model.modules():
                for attr in ("activations", "max_batch_len"):
                    if hasattr(module, attr):
                        delattr(module, attr)
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

    def _run(self, loss_fn: Callable[[Any, Any], torch.Tensor], key: str,
             unpack: Callable[[Any], tuple[Any, Any]]) -> tuple[int, int, float, int]:
        self._dp_optimizer.generator = torch.Generator(device=self.device).manual_seed(self._seed_for("noise", key))
        loader = self._loader(torch.Generator().manual_seed(self._seed_for("sampling", key)))
        if self._clipper is not None:
            self._clipper.clear()  # forwards outside a round (evaluation) left records behind
        self.model.train()
        forward = self._ddp if self._ddp is not None else self.model
        start, batches, loss_sum, seen = self._steps_taken, 0, 0.0, 0
        with self._physical_batches(loader) as physical:
            for batch in physical:
                batches += 1
                size = leading_size(batch)
                if size == 0:
                    self._empty_backward()
                else:
                    inputs, targets = unpack(to_device(batch, self.device))
                    losses = loss_fn(forward(inputs), targets)
                    total = self._backward(losses, size, key)
                    loss_sum, seen = loss_sum + total, seen + size
                before = self._steps_taken
                self._dp_optimizer.step()
                self._dp_optimizer.zero_grad(set_to_none=True)
                if self._steps_taken != before:
                    self._check_parameters(key, self._steps_taken - start)
        return self._steps_taken - start, batches, loss_sum, seen

    def _backward(self, losses: object, size: int, key: str) -> float:
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
        with warnings.catch_warnings():
            # Opacus' hooks fire on module outputs when the input needs no gradient, as intended.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            if self.clipping is ClippingMode.PER_SAMPLE:
                (losses.mean() if per_sample else losses).backward()
            elif self.clipping is ClippingMode.GHOST:
                DPTensorFastGradientClipping(self._hooks, self._dp_optimizer, losses, "mean").backward()
            else:
                self._clipper.backward(losses)
        return total

    def _empty_backward(self) -> None:
        # An empty Poisson batch still takes a noise-only step; skipping it would leak emptiness.
        for p in self._trainable:
            if self.clipping is ClippingMode.PER_SAMPLE:
                p.grad_sample = p.new_zeros((0, *p.shape))
            elif p.grad is None:
                p.grad = torch.zeros_like(p)

    def _check_parameters(self, key: str, step: int) -> None:
        finite = torch.stack([torch.isfinite(p).all() for p in self._trainable]).all() if self._trainable else True
        if not bool(finite):
            raise PrivacyError(f"step {step} of round {key!r} produced NaN or infinite parameters (the "
                               "gradients were not finite): lower the learning rate or check the model for "
                               "unstable operations; the model was restored to the start of the round and "
                               "the round keeps its charge, so retry under a new round_id")


def _optimizer_for(model: torch.nn.Module, optimizer: object, problems: list[str]) -> Any:
    if isinstance(optimizer, DPOptimizer):
        problems.append("pass the plain torch optimizer, not an Opacus DPOptimizer: make_private wraps it")
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for g in optimizer.param_groups for p in g["params"]):
            problems.append("the optimizer holds parameters that are not the model's; build it from "
                            "model.parameters() or pass a factory such as lambda ps: torch.optim.SGD(ps, lr=0.1)")
        return optimizer
    if callable(optimizer):
        return optimizer
    problems.append(f"optimizer must be a torch.optim.Optimizer or a factory taking the trainable "
                    f"parameters, got {type(optimizer).__name__}")
    return None


def _choose_clipping(model: torch.nn.Module, config: DPSGDConfig) -> tuple[ClippingMode, Any]:
    """The clipping mode to run, and securefed's engine attached to ``model`` when it is FAST."""
    if config.clipping in (ClippingMode.PER_SAMPLE, ClippingMode.GHOST):
        return config.clipping, None
    if config.clipping is ClippingMode.AUTO and config.distributed:
        return ClippingMode.PER_SAMPLE, None
    try:
        return ClippingMode.FAST, BookKeepingClipper(model, max_grad_norm=float(config.max_grad_norm))
    except ConfigError:
        if config.clipping is ClippingMode.FAST:
            raise
        return ClippingMode.PER_SAMPLE, None  # a layer the engine cannot handle: Opacus' hooks can


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer | OptimizerFactory,
                 data: Dataset | DataLoader, *, config: DPSGDConfig, ledger: PrivacyLedger | None = None,
                 seed: int | bytes | str | None = None) -> PrivateTraining:
    """Make a site's model, optimizer and data private for DP-SGD across federated rounds.

    ``optimizer`` is an optimizer over the model's parameters or a factory called with the
    trainable parameters once the model is on its device. ``data`` is a map-style Dataset or a
    DataLoader over one (its collate function, workers and pinning are kept; its batch size,
    sampler and shuffling are replaced by Poisson sampling at ``config.batch_size``). ``ledger``
    is a :class:`~securefed.privacy.ledger.PrivacyLedger` charged before every round; its budget
    delta must equal ``config.delta``. ``seed`` makes sampling and noise reproducible (simulation
    only). Every problem with the arguments is reported in one ConfigError.
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
    opt = _optimizer_for(model, optimizer, problems) if isinstance(model, torch.nn.Module) else None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, bytes, str))):
        problems.append(f"seed must be None, an int, bytes or a str, got {type(seed).__name__}")
    if ledger is not None and ledger.budget.delta != config.delta:
        problems.append(f"config.delta={config.delta:g} differs from the ledger's budget delta "
                        f"{ledger.budget.delta:g}; use the same delta so calibration and the ledger agree")
    if ledger is not None and ledger.accountant is not config.accountant:
        problems.append(f"config.accountant={config.accountant.value!r} differs from the ledger's accountant "
                        f"{ledger.accountant.value!r}; use the same one so calibration and the ledger agree")
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
        try:
            require_dp_compatible(model)
        except ConfigError as exc:
            problems.extend(exc.problems)
    try:
        device = resolve_device(config.device, distributed=config.distributed)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    model.to(device)
    if not isinstance(opt, torch.optim.Optimizer):
        opt = opt([p for p in model.parameters() if p.requires_grad])
    clipping, clipper = _choose_clipping(model, config)
    return PrivateTraining(model=model, optimizer=opt, data=poisson_data, plan=plan,
                           config=config, device=device, clipping=clipping, clipper=clipper, ledger=ledger, seed=seed)
