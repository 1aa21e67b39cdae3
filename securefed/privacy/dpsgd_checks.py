"""The guards of a DP-SGD round (Opacus adapter): what must hold before a step is released.

DP-SGD (Abadi et al. 2016) is private only if the sum it noises has L2 sensitivity C: each
record's contribution is clipped to C and nothing else enters the sum. The clipping machinery
cannot see every way that can fail, so :mod:`securefed.privacy.dpsgd` checks, per round:

* **Stale state.** ``p.grad``, Opacus' ``grad_sample`` / ``_current_grad_sample`` /
  ``_norm_sample`` / ``summed_grad``, its forward counters and the activations its hooks keep
  are cleared before a round starts and after it ends (:func:`clear_training_state`): a
  non-private backward, or a forward with gradients between rounds, would otherwise leak into,
  or break, the next released step.
* **One row per record.** Per-sample gradients (and ghost norms) must have exactly the batch's
  number of rows. A model that folds slices or patches into the batch dimension gets K rows per
  record, each clipped to C: K C per record. Refused before the step (:func:`per_sample_rows`).
* **The triangle bound.** The clipped sum ``sum_i c_i g_i`` can never be longer than
  ``sum_i c_i ||g_i||`` with the norms the clipper used (per parameter where ghost clipping
  has them, else over the model). A longer ``sum p.grad`` means a parameter was used where the
  hooks did not look (a parent calling ``F.linear`` on a child's weight, weight tying): the
  step is refused (:func:`check_release_bound`). The test is necessary, not sufficient: it
  catches such misses when the records' gradients roughly align, not when they cancel.
* **Separable losses.** Clipping bounds a record's influence only if loss i depends on output i
  alone. Once per round the loss is probed on a detached copy of the outputs: one vector-Jacobian
  product of loss 0 (zero rows j != 0 expected), or, for a scalar loss, additivity over a split of
  the batch (:func:`check_losses_separable`). A heuristic: it catches batch means, batch-pooled
  Dice and contrastive terms on the data at hand, not every coupling.
* **Distributed agreement.** Before each noised step the ranks all-reduce whether each got
  there; if one failed, all raise together instead of waiting forever in the gradient
  all-reduce (:func:`ranks_agree`).
* **Ledger.** The DP-SGD charges of a ledger (Poisson-sampled Gaussian, record level) are what
  ``target_epsilon`` is checked against, and their round ids may not be reused.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from ..errors import ConfigError, PrivacyError
from .dpsgd_config import ClippingMode, DPSGDConfig
from .fast_clipping import SUPPORTED_LAYERS, BookKeepingClipper, foreign_parameters
from .model_compat import require_dp_compatible

if TYPE_CHECKING:
    from .ledger import PrivacyLedger

__all__ = ["clear_training_state", "optimizer_problems", "optimizer_for", "optimizer_from_factory",
           "model_problems", "choose_clipping", "check_finite_parameters", "per_sample_rows", "ghost_backward",
           "check_release_bound", "check_losses_separable", "ranks_agree", "ghost_trial_problems",
           "ledger_problems"]

_OPACUS_PARAM_STATE = ("_current_grad_sample", "_norm_sample")
# Opacus' ghost clipping coefficient, min(1, C / (norm + this)), kept so the modes agree.
_GHOST_EPS = 1e-6
# Slack of the triangle test, relative and in units of C: rounding of the norms and of the sum
# (TF32 convolutions) must never refuse a correct step; the misses it exists for are factors of 2.
_BOUND_RTOL, _BOUND_ATOL = 0.02, 1e-6
# The separability probe: cross-sample gradient entries up to this fraction of the own ones, and
# additivity up to this relative error, are rounding.
_COUPLING_RTOL, _ADDITIVE_RTOL = 1e-6, 1e-4
_STANDARD_LAYERS = tuple(base for base, _ in SUPPORTED_LAYERS)
_KEEPS_CHARGE = "the model was restored to the start of the round and the round keeps its charge"


# --------------------------------------------------------------------------- state between rounds
def clear_training_state(model: nn.Module) -> None:
    """Drop every gradient and every per-sample quantity on ``model``'s parameters and layers."""
    for p in model.parameters():
        p.grad = None
        if getattr(p, "grad_sample", None) is not None:
            p.grad_sample = None
        if getattr(p, "summed_grad", None) is not None:
            p.summed_grad = None
        if hasattr(p, "_forward_counter"):
            p._forward_counter = 0
        for attr in _OPACUS_PARAM_STATE:
            if hasattr(p, attr):
                delattr(p, attr)
    for module in model.modules():
        # only what Opacus' hooks keep (plain attributes: a list of input lists, an int), never a
        # submodule or anything else of the user's that happens to have the same name
        state = module.__dict__
        if isinstance(state.get("activations"), list) and all(isinstance(a, list) for a in state["activations"]):
            del module.activations
        if type(state.get("max_batch_len")) is int:
            del module.max_batch_len


def optimizer_problems(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer must hold every trainable parameter of ``model`` and nothing else.

    A trainable parameter the optimizer does not hold would keep a gradient that is never
    noised (and is easily read or stepped by someone else).
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    owned = {id(p) for p in model.parameters()}
    problems = []
    if held - owned:
        problems.append("the optimizer holds parameters that are not the model's; build it from "
                        "model.parameters() or pass a factory such as lambda ps: torch.optim.SGD(ps, lr=0.1)")
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        problems.append(f"the optimizer does not hold the trainable parameter(s) {_shorten(missing)}: their "
                        "gradients would never be noised; freeze them with requires_grad_(False) or add "
                        "them to the optimizer (a factory gets every trainable parameter)")
    return problems


def optimizer_for(model: nn.Module, optimizer: object, problems: list[str]) -> Any:
    """``optimizer`` if it is a plain optimizer over the model (or a factory), else None and problems."""
    if isinstance(optimizer, DPOptimizer):
        problems.append("pass the plain torch optimizer, not an Opacus DPOptimizer: make_private wraps it")
        return None
    if isinstance(optimizer, torch.optim.Optimizer):
        problems.extend(optimizer_problems(model, optimizer))
        return optimizer
    if callable(optimizer):
        return optimizer
    problems.append(f"optimizer must be a torch.optim.Optimizer or a factory taking the trainable "
                    f"parameters, got {type(optimizer).__name__}")
    return None


def optimizer_from_factory(model: nn.Module, factory: Callable[[list[nn.Parameter]], Any]) -> torch.optim.Optimizer:
    optimizer = factory([p for p in model.parameters() if p.requires_grad])
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DPOptimizer):
        raise ConfigError(f"the optimizer factory must return a plain torch.optim.Optimizer, got "
                          f"{type(optimizer).__name__}")
    problems = optimizer_problems(model, optimizer)
    if problems:
        raise ConfigError(problems)
    return optimizer


def model_problems(model: nn.Module, *, ghost: bool, example_input: object) -> list[str]:
    """Model compatibility; with ``example_input`` a trial step on a copy (and, for GHOST, a call count)."""
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        return [f"example_input must be a batch tensor (batch dimension first), got {type(example_input).__name__}"]
    first = next(model.parameters(), None)
    if example_input is not None and first is not None:
        example_input = example_input.to(first.device)
    # Opacus' per-layer samplers and the FAST rules differentiate a standard layer's leaf weight
    # and bias; a reparametrised one would get wrong per-sample gradients, or none.
    problems = [f"layer {name!r} ({type(m).__name__}) has {foreign}, not a leaf weight/bias (weight_norm or a "
                "parametrization?): per-sample gradients cannot be computed for it; remove the "
                "reparametrisation or freeze the layer with requires_grad_(False)"
                for name, m in model.named_modules() if isinstance(m, _STANDARD_LAYERS)
                and any(p.requires_grad for p in m.parameters()) and (foreign := foreign_parameters(m))]
    try:
        require_dp_compatible(model, example_input=example_input)
    except ConfigError as exc:
        return problems + list(exc.problems)
    return problems + (ghost_trial_problems(model, example_input) if example_input is not None and ghost else [])


def choose_clipping(model: torch.nn.Module, config: DPSGDConfig) -> tuple[ClippingMode, Any]:
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


def check_finite_parameters(params: list[nn.Parameter], *, key: str, step: int) -> None:
    finite = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else True
    if not bool(finite):
        raise PrivacyError(f"step {step} of round {key!r} produced NaN or infinite parameters (the "
                           "gradients were not finite): lower the learning rate or check the model for "
                           f"unstable operations; {_KEEPS_CHARGE}, so retry under a new round_id")


def _shorten(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- one row per record
def _rows_problem(wrong: list[str], missing: list[str], size: int, key: str, what: str) -> ConfigError:
    problems = []
    if wrong:
        problems.append(
            f"{what} have another number of rows than the batch's {size} records for {', '.join(wrong)}: "
            "the model folds extra dimensions (slices, patches, crops) into the batch, so each record "
            "would be clipped once per row; keep one row per record through every trainable layer, or "
            f"use clipping='fast', which refuses such a layer ({_KEEPS_CHARGE}; round {key!r})")
    if missing:
        problems.append(
            f"no {what} were computed for {_shorten(missing)}: a parameter not used in this forward pass, "
            "or used only outside its own layer, cannot be clipped; freeze it with requires_grad_(False) "
            f"or use it through its layer ({_KEEPS_CHARGE}; round {key!r})")
    return ConfigError(problems)


def per_sample_rows(named: list[tuple[str, nn.Parameter]], size: int, key: str) -> None:
    """Opacus' hooks left exactly ``size`` per-sample gradients on every trainable parameter."""
    wrong, missing = [], []
    for name, p in named:
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            missing.append(name)
            continue
        rows = {int(t.shape[0]) for t in (sample if isinstance(sample, list) else [sample])}
        if rows != {size}:
            wrong.append(f"{name!r} ({'/'.join(map(str, sorted(rows)))} rows)")
    if wrong or missing:
        raise _rows_problem(wrong, missing, size, key, "per-sample gradients")


def _direct_uses(root: torch.Tensor) -> dict[int, int]:
    """How many autograd edges lead into each leaf's gradient accumulator, by id of the leaf."""
    uses: dict[int, int] = {}
    seen: set[Any] = set()
    stack = [root.grad_fn] if root.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)  # an AccumulateGrad node
            if leaf is not None:
                uses[id(leaf)] = uses.get(id(leaf), 0) + 1
            else:
                stack.append(child)
    return uses


def _refuse_unseen_uses(hooks: Any, named: list[tuple[str, nn.Parameter]], losses: torch.Tensor, key: str) -> None:
    # Each call of a standard layer uses its weight and bias once; more uses in the loss's graph
    # than hooked calls (Opacus' forward counter) are uses the ghost norms would not include.
    standard = {id(p) for m in hooks._module.modules() if isinstance(m, _STANDARD_LAYERS)
                for p in m.parameters(recurse=False)}
    uses = _direct_uses(losses)
    unseen = [name for name, p in named if id(p) in standard and uses.get(id(p), 0) > getattr(p, "_forward_counter", 0)]
    if unseen:
        raise ConfigError(f"{_shorten(unseen)} are used outside their own layer's forward (a parent module "
                          "calling F.linear on a child's weight?): ghost clipping would not clip those uses; use "
                          f"each parameter only through its layer, or clipping='fast' or 'per-sample' "
                          f"({_KEEPS_CHARGE}; round {key!r})")


def ghost_backward(hooks: Any, named: list[tuple[str, nn.Parameter]], losses: torch.Tensor, *,
                   max_grad_norm: float, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacus' ghost clipping (Li et al. 2022) in two backward passes, with the row check between.

    The first pass leaves each parameter's per-sample norms (``p._norm_sample``), the second
    backpropagates ``sum_i c_i loss_i`` with the hooks off, so ``p.grad = sum_i c_i g_i``.
    Returns the per-parameter norms (P, B) and the coefficients the second pass used.
    """
    size = int(losses.shape[0])
    _refuse_unseen_uses(hooks, named, losses, key)
    for _, p in named:
        if hasattr(p, "_norm_sample"):
            del p._norm_sample
    losses.mean().backward(retain_graph=True)
    wrong, missing, columns = [], [], []
    for name, p in named:
        norm = getattr(p, "_norm_sample", None)
        if norm is None:  # not reached by the hooks: fine only if it got no gradient either
            if p.grad is not None and bool((p.grad != 0).any()):
                missing.append(name)
            columns.append(losses.new_zeros(size))
        elif norm.shape[0] != size:
            wrong.append(f"{name!r} ({norm.shape[0]} rows)")
        else:
            columns.append(norm.to(losses.device, losses.dtype))
        p.grad = None  # the first pass's (unclipped) mean gradient is not released
    if wrong or missing:
        raise _rows_problem(wrong, missing, size, key, "per-sample gradient norms")
    per_parameter = torch.stack(columns) if columns else losses.new_zeros(0, size)
    coefficients = (max_grad_norm / (per_parameter.norm(dim=0) + _GHOST_EPS)).clamp(max=1.0)
    hooks.disable_hooks()
    try:
        (coefficients.detach() * losses).sum().backward()
    finally:
        hooks.enable_hooks()
    return per_parameter.detach(), coefficients.detach()


def check_release_bound(named: list[tuple[str, nn.Parameter]], norms: torch.Tensor, coefficients: torch.Tensor, *,
                        max_grad_norm: float, key: str) -> None:
    """Refuse ``sum p.grad`` longer than ``sum_i c_i ||g_i||`` (the triangle inequality).

    ``norms`` is (B,) for the whole model, or (P, B) per parameter (ghost clipping has them),
    which tests each parameter on its own: a parameter used twice where one use was seen by
    the hooks shows up even when the rest of the model hides it.
    """
    groups = [(name, [p], row) for (name, p), row in zip(named, norms)] if norms.dim() == 2 else \
        [("the model", [p for _, p in named], norms)]
    for name, params, row in groups:
        released = math.sqrt(sum(float(p.grad.detach().double().square().sum()) for p in params
                                 if p.grad is not None))
        bound = float((coefficients.double() * row.double()).sum())
        if not released <= bound * (1 + _BOUND_RTOL) + _BOUND_ATOL * max_grad_norm:
            raise PrivacyError(
                f"the clipped gradient sum of {name!r} in round {key!r} has norm {released:.6g}, more than "
                f"the {bound:.6g} that its per-sample norms allow: the parameter is used outside the layer "
                "the clipping hooks watch (a parent module calling F.linear on a child's weight, weight "
                "tying), so its per-sample contribution was not clipped; use each parameter only through "
                f"its own layer, or clipping='per-sample'. Nothing was released; {_KEEPS_CHARGE}")


# --------------------------------------------------------------------------- separable losses
def _detached(obj: Any) -> Any:
    """``obj`` with each floating tensor replaced by a detached leaf that requires grad."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().requires_grad_(obj.is_floating_point() or obj.is_complex())
    if isinstance(obj, Mapping):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_detached(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _rows(obj: Any, rows: slice, size: int) -> Any:
    """The records ``rows`` of every batch-first tensor in ``obj`` (None if one is not batch-first)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()[rows] if obj.dim() and obj.shape[0] == size else None
    if isinstance(obj, Mapping):
        out = {k: _rows(v, rows, size) for k, v in obj.items()}
        return None if any(v is None and obj[k] is not None for k, v in out.items()) else out
    if isinstance(obj, (list, tuple)):
        items = [_rows(v, rows, size) for v in obj]
        if any(v is None and o is not None for v, o in zip(items, obj)):
            return None
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _coupling_error(key: str, how: str) -> ConfigError:
    return ConfigError(
        f"loss_fn couples the records of a batch ({how}): one record then changes the loss, and so the "
        "clipped gradient, of the others, and per-sample clipping no longer bounds its influence. Use "
        "a loss that is a per-record term, e.g. securefed.privacy.losses.per_sample_dice_loss or "
        "dice_ce_loss(..., reduction='none'), and no batch statistics (MONAI DiceLoss(batch=True), "
        f"batch means, contrastive terms) ({_KEEPS_CHARGE}; round {key!r})")


def check_losses_separable(loss_fn: Callable[[Any, Any], Any], outputs: Any, targets: Any,
                           losses: torch.Tensor, *, size: int, key: str) -> None:
    """Refuse a loss whose term for one record depends on the others' outputs (see the module doc)."""
    if losses.dim() == 1:
        probe_outputs = _detached(outputs)
        leaves = [t for t in _tensors(probe_outputs) if t.requires_grad and t.dim() and t.shape[0] == size]
        if size < 2 or not leaves:
            return
        with torch.enable_grad():
            probe = loss_fn(probe_outputs, targets)
        if not isinstance(probe, torch.Tensor) or probe.shape != (size,) or not probe.requires_grad:
            return
        for grad in torch.autograd.grad(probe[0], leaves, allow_unused=True):
            if grad is None:
                continue
            own, others = float(grad[0].abs().max()), float(grad[1:].abs().max())
            if others > _COUPLING_RTOL * own and others > 0:
                raise _coupling_error(key, "the loss of record 0 has a gradient through other records' outputs")
        return
    first = (_rows(outputs, slice(0, 1), size), _rows(targets, slice(0, 1), size))
    rest = (_rows(outputs, slice(1, None), size), _rows(targets, slice(1, None), size))
    if size < 2 or any(part is None for part in (*first, *rest)):
        return
    with torch.no_grad():
        whole, alone, others = float(losses.detach()), float(loss_fn(*first)), float(loss_fn(*rest))
    scale = abs(size * whole) + abs(alone) + abs((size - 1) * others) + 1e-12
    as_mean = abs(size * whole - alone - (size - 1) * others) <= _ADDITIVE_RTOL * scale
    as_sum = abs(whole - alone - others) <= _ADDITIVE_RTOL * scale
    if not (as_mean or as_sum):
        raise _coupling_error(key, "the scalar loss of the batch is neither the mean nor the sum of the "
                                   "losses of its parts")


# --------------------------------------------------------------------------- distributed agreement
def ranks_agree(failure: BaseException | None, *, key: str, device: torch.device) -> None:
    """All-reduce which ranks failed; raise on every rank if any did (own error first)."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    failed = torch.zeros(world, dtype=torch.int32, device=device)
    failed[rank] = int(failure is not None)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.SUM)
    if failure is not None:
        raise failure
    ranks = [r for r, bad in enumerate(failed.tolist()) if bad]
    if ranks:
        raise PrivacyError(f"rank(s) {ranks} failed during round {key!r} (see their error), so this rank "
                           f"stops too and no step is released; {_KEEPS_CHARGE}")


# --------------------------------------------------------------------------- before any charge
def ghost_trial_problems(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Layers Opacus' ghost clipping refuses only mid-round: called twice, or sharing a parameter."""
    trial = copy.deepcopy(model).train()
    owners: dict[int, list[str]] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, module in trial.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        for p in own:
            owners.setdefault(id(p), []).append(name or "(the model itself)")
        if own:
            def count(_module: nn.Module, _args: Any, _output: Any, name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1
            handles.append(module.register_forward_hook(count))
    try:
        with torch.no_grad():
            trial(example_input)
    finally:
        for handle in handles:
            handle.remove()
    problems = [f"layer {name!r} runs {n} times in one forward pass, which clipping='ghost' does not support; "
                "use clipping='fast' or 'per-sample'" for name, n in calls.items() if n > 1]
    problems += [f"layers {_shorten(names)} share a trainable parameter (weight tying), which clipping='ghost' "
                 "does not support; use clipping='per-sample'" for names in owners.values() if len(names) > 1]
    return problems


def ledger_problems(ledger: PrivacyLedger, config: DPSGDConfig) -> list[str]:
    problems = []
    if ledger.budget.delta != config.delta:
        problems.append(f"config.delta={config.delta:g} differs from the ledger's budget delta "
                        f"{ledger.budget.delta:g}; use the same delta so calibration and the ledger agree")
    if ledger.accountant is not config.accountant:
        problems.append(f"config.accountant={config.accountant.value!r} differs from the ledger's accountant "
                        f"{ledger.accountant.value!r}; use the same one so calibration and the ledger agree")
    return problems
