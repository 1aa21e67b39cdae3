"""A fast per-sample clipping engine for DP-SGD: book-keeping with mixed ghost clipping.

DP-SGD (Abadi et al. 2016) needs, per step, ``sum_i min(1, C / ||g_i||) g_i`` where ``g_i`` is
sample i's gradient over the whole model. Opacus' default mode instantiates every ``g_i`` for
every layer on top of the ordinary backward; its ghost mode runs a second backward pass and has
ghost norms only for Linear and Embedding. This engine follows book-keeping (Bu, Wang, Zha,
Karypis 2023, "Differentially private optimization on large model at small cost"):

1. one forward pass, during which hooks keep each trainable layer's input and the autograd edge
   of its output (not the output tensor, so in-place activations afterwards do no harm);
2. one backward pass that asks autograd only for the gradients of the summed loss at those
   edges (``torch.autograd.grad``), so no parameter gradient is computed;
3. per layer, every sample's squared gradient norm, by ghost norm or by instantiating the
   per-sample gradient, whichever costs less for that layer (mixed ghost clipping, Bu, Mao, Xu
   2022); then ``c_i = min(1, C / ||g_i||)`` over all layers together;
4. per layer, the clipped sum as one weighted contraction ``sum_i c_i a_i^T g_i`` - the ordinary
   weight gradient with the output gradient scaled by ``c_i`` - added into ``p.grad``.

Step 4 costs what the non-private backward spends on weight gradients, and step 2 skips exactly
that, so the price of privacy is step 3. How each layer kind does steps 3 and 4 is in
:mod:`securefed.privacy.fast_clipping_layers`; :func:`choose_plan` is the per-layer cost model.
Where instantiating wins, the per-sample gradients are kept for step 4 (instead of a second
contraction) only while they take at most a few times the layer's own activations, so no
per-sample gradient of the whole model is ever held and memory stays O(activations).

Requirements: the model is DP-compatible (no BatchNorm; no in-place op on a layer's input after
the layer ran; :func:`securefed.privacy.model_compat.make_dp_compatible`), batch first, and every
trainable parameter is used only by the layer that owns it (a use elsewhere is not clipped, so
it is left out of the sum). Two layers sharing a parameter (weight tying: each use would be
clipped on its own, up to k C per sample) and a layer whose weight is computed from other
parameters (``weight_norm``, parametrizations) are refused at construction. Forward passes with
gradients on record inputs until the next ``backward`` (or ``clear()``); ones the loss does not
depend on are ignored. Use::

    clipper = BookKeepingClipper(model, max_grad_norm=C)
    optimizer.zero_grad()
    norms = clipper.backward(per_sample_losses)  # shape (B,): p.grad += clipped sum
    add_noise_(model.parameters(), noise_multiplier=z, max_grad_norm=C,
               expected_batch_size=L, generator=gen)  # p.grad = (p.grad + N(0, (zC)^2)) / L
    optimizer.step()

Opacus' ``DPOptimizerFastGradientClipping`` expects exactly this (the clipped sum in ``p.grad``:
its ``step`` moves ``p.grad`` into ``p.summed_grad``, adds ``N(0, (z C)^2)`` and divides by
``expected_batch_size`` when ``loss_reduction="mean"``), so it can replace ``add_noise_``:
wrap the plain optimizer with ``DPOptimizerFastGradientClipping(opt, noise_multiplier=z,
max_grad_norm=C, expected_batch_size=L)``, call its ``zero_grad()`` before
``clipper.backward(...)`` and its ``step()`` after; its step hook feeds Opacus' accountants.
Do not also wrap the model in an Opacus ``GradSampleModule``.

A trainable layer the engine cannot handle raises :class:`ConfigError` at construction, naming
every such layer, so a caller can fall back to Opacus' per-sample mode. The cost model was fitted
on one CPU thread; on CUDA the engine computes the same numbers, but its choices are not tuned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, PrivacyError
from .fast_clipping_layers import (
    ConvRule,
    EmbeddingRule,
    GroupNormRule,
    InstanceNormRule,
    LayerCosts,
    LayerNormRule,
    LayerPlan,
    LayerRule,
    LinearRule,
    PReLURule,
    Record,
)

__all__ = ["BookKeepingClipper", "LayerPlan", "SUPPORTED_LAYERS", "add_noise_", "choose_plan", "foreign_parameters"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
SUPPORTED_LAYERS: tuple[tuple[type[nn.Module], type[LayerRule]], ...] = (
    *((c, ConvRule) for c in _CONVS),
    (nn.Linear, LinearRule),
    (nn.GroupNorm, GroupNormRule),
    *((c, InstanceNormRule) for c in _INSTANCE_NORMS),
    (nn.LayerNorm, LayerNormRule),
    (nn.PReLU, PReLURule),
    (nn.Embedding, EmbeddingRule),
)
# Cost model weights, in multiply-adds, fitted to per-layer timings of MONAI DenseNet121 and UNet
# (batch 16, 64 x 64) on one CPU thread: writing and re-reading one per-sample gradient entry
# costs about as much as this many multiply-adds (memory-bound passes), a gathered Gram entry this.
_PER_SAMPLE_ENTRY_COST = 16
_GATHER_COST = 16
# per-sample gradients are kept for the clipped sum only while they take no more than this many
# times the memory of the layer's input and output, so the engine's memory stays O(activations)
_KEEP_MEMORY_RATIO = 8
_FALLBACK = "use a supported layer, or Opacus' per-sample mode (grad_sample_mode='hooks')"


def _rule_for(module: nn.Module) -> LayerRule | str:
    """The rule for ``module``, or why it has none."""
    for base, rule in SUPPORTED_LAYERS:
        if isinstance(module, base):
            # a subclass computing something other than its base would get wrong gradients
            if type(module).forward is not base.forward:
                return f"{type(module).__name__} subclasses {base.__name__} but overrides forward()"
            if isinstance(module, nn.Embedding) and module.sparse:
                return f"{type(module).__name__}(sparse=True) is not supported; use sparse=False"
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                return (f"{type(module).__name__}(scale_grad_by_freq=True) mixes the samples' "
                        "gradients; use scale_grad_by_freq=False")
            return rule(module)
    return f"{type(module).__name__} is not a supported layer type"


def foreign_parameters(module: nn.Module) -> str:
    """What about ``module``'s parameters its rule would miss ('' if nothing): a rule computes the
    gradients of the leaf ``weight`` and ``bias`` Parameters the layer owns, and of nothing else."""
    extra = [n for n, p in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
    computed = [n for n in ("weight", "bias") if isinstance(getattr(module, n, None), torch.Tensor)
                and getattr(module, n).requires_grad and module._parameters.get(n) is not getattr(module, n)]
    parts = [f"parameters {extra}"] if extra else []
    parts += [f"a computed {n!r}" for n in computed]
    return " and ".join(parts)


def choose_plan(costs: LayerCosts) -> LayerPlan:
    """Mixed ghost clipping's per-layer choice, plus book-keeping's keep-or-recompute choice.

    Per sample: the ghost norm costs its Grams and gathers plus one weighted contraction for the
    clipped sum; instantiating costs one contraction plus writing the per-sample gradient, and a
    second contraction for the sum unless the per-sample gradients are kept.
    """
    written = _PER_SAMPLE_ENTRY_COST * costs.per_sample
    options = [(costs.gram + _GATHER_COST * costs.gathers + costs.contraction, 0, LayerPlan.GHOST),
               (2 * costs.contraction + written, 1, LayerPlan.INSTANTIATE)]
    if costs.per_sample <= _KEEP_MEMORY_RATIO * costs.activation:
        options.append((costs.contraction + written, 2, LayerPlan.INSTANTIATE_AND_KEEP))
    return min(options)[2]


def _parse_plan(plan: LayerPlan | str | None, problems: list[str]) -> LayerPlan | None:
    if plan is None or isinstance(plan, LayerPlan):
        return plan
    if isinstance(plan, str):
        if plan == "auto":
            return None
        for member in LayerPlan:
            if plan == member.value:
                return member
    problems.append(f"plan must be None, 'auto' or one of {[p.value for p in LayerPlan]}, got {plan!r}")
    return None


def _check_positive(name: str, value: object, problems: list[str]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        problems.append(f"{name} must be a finite number > 0, got {value!r}")


class BookKeepingClipper:
    """Per-sample gradient clipping for DP-SGD in one forward and one backward pass.

    ``BookKeepingClipper(module, max_grad_norm=C)`` hooks every trainable layer of ``module``;
    ``backward(per_sample_losses)`` then adds ``sum_i min(1, C / ||g_i||) g_i`` to every trainable
    parameter's ``.grad`` (``g_i``: the gradient of ``per_sample_losses[i]`` over all layers) and
    returns the norms ``||g_i||``. ``plan`` forces one :class:`LayerPlan` on every layer that has
    a choice (for tests and measurements); ``None`` or ``"auto"`` picks per layer by cost.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float,
                 plan: LayerPlan | str | None = None) -> None:
        problems: list[str] = []
        _check_positive("max_grad_norm", max_grad_norm, problems)
        self._forced = _parse_plan(plan, problems)
        if not isinstance(module, nn.Module):
            raise ConfigError(problems + [f"module must be a torch.nn.Module, got {type(module).__name__}"])
        self._names: list[str] = []
        self._rules: list[LayerRule] = []
        owners: dict[int, list[str]] = {}
        for name, sub in module.named_modules():
            label = name or "(the model itself)"
            if isinstance(sub, _BatchNorm):
                problems.append(
                    f"layer {label!r} ({type(sub).__name__}) mixes samples through batch statistics, "
                    "so per-sample gradients are undefined; replace it with GroupNorm "
                    "(securefed.privacy.model_compat.make_dp_compatible)")
                continue
            if not any(p.requires_grad for p in sub.parameters(recurse=False)):
                continue
            rule = _rule_for(sub)
            if isinstance(rule, str):
                problems.append(f"layer {label!r} has trainable parameters but {rule}; {_FALLBACK}")
                continue
            foreign = foreign_parameters(sub)
            if foreign:
                problems.append(f"layer {label!r} has {foreign}, not the leaf weight/bias its rule differentiates "
                                f"(weight_norm or a parametrization?); {_FALLBACK}")
                continue
            for p in sub.parameters(recurse=False):
                if p.requires_grad:
                    owners.setdefault(id(p), []).append(label)
            self._names.append(label)
            self._rules.append(rule)
        problems.extend(f"layers {', '.join(map(repr, labels))} share a trainable parameter (weight tying): "
                        "each use would be clipped on its own, so a sample could contribute more than "
                        f"max_grad_norm; untie them, or {_FALLBACK}"
                        for labels in owners.values() if len(labels) > 1)
        if not self._rules and not problems:
            problems.append("module has no trainable parameters: nothing to clip")
        if problems:
            raise ConfigError(problems)
        self.max_grad_norm = float(max_grad_norm)
        self.module = module
        self._records: list[list[Record]] = [[] for _ in self._rules]
        self._handles = [rule.module.register_forward_hook(self._hook(i), with_kwargs=True)
                         for i, rule in enumerate(self._rules)]
        self.last_plans: dict[str, LayerPlan] = {}

    def _hook(self, index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            inputs = args[0] if args else kwargs.get("input")
            if not isinstance(inputs, torch.Tensor):
                raise ConfigError(f"layer {self._names[index]!r} was called without a tensor input")
            record = Record(inputs, output)
            self._rules[index].on_record(record, output)
            self._records[index].append(record)

        return record

    def remove(self) -> None:
        """Detach the hooks from the model and drop anything recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Drop what the forward passes since the last ``backward`` recorded."""
        self._records = [[] for _ in self._rules]

    def backward(self, per_sample_losses: torch.Tensor) -> torch.Tensor:
        """Add the clipped per-sample gradient sum to ``p.grad``; return the norms (shape (B,))."""
        losses = per_sample_losses
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.requires_grad:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ConfigError(f"per_sample_losses must be a 1-d tensor (one loss per sample) that "
                              f"requires grad, got {shape}; use the criterion with reduction='none' "
                              "and average any other dimensions per sample")
        batch = losses.shape[0]
        pending = [(name, rule, recs) for name, rule, recs in zip(self._names, self._rules, self._records)
                   if recs]
        self.clear()
        self._check_versions(pending)
        if batch == 0:  # an empty Poisson batch: nothing to clip, but the step still gets noised
            self._zero_missing_grads()
            self.last_plans = {}
            return losses.detach().new_zeros(0)
        # gradients at the layers' outputs only: autograd then skips every weight gradient
        edges = [r.edge for _, _, recs in pending for r in recs]
        grads = torch.autograd.grad(losses.sum(), edges, allow_unused=True) if edges else []
        grads_iter = iter(grads)
        layers = []
        for name, rule, recs in pending:
            used = []
            for r, g in zip(recs, grads_iter):
                r.edge = None  # the graph is freed
                if g is None:  # a stale forward, or an output the loss does not depend on
                    continue
                r.grad_output = g
                used.append(r)
            if used:
                layers.append((name, rule, used))
        wrong = [f"{name!r} (batch {r.inputs.shape[0]})" for name, _, recs in layers for r in recs
                 if r.inputs.shape[0] != batch or r.grad_output.shape[0] != batch]
        if wrong:
            raise ConfigError(f"per_sample_losses has {batch} entries but these layers saw another "
                              f"batch size: {', '.join(wrong)}; inputs must be batch-first")
        squared = losses.new_zeros(batch, dtype=torch.float32 if losses.dtype != torch.float64 else None)
        plans, kept = [], []
        for _, rule, recs in layers:
            plan = rule.fixed_plan or self._forced or choose_plan(rule.costs(recs))
            sq, keep = rule.squared_norms(recs, plan)
            squared += sq.to(squared.dtype)
            plans.append(plan)
            kept.append(keep)
        norms = squared.clamp_min(0).sqrt()
        if not bool(torch.isfinite(norms).all()):
            raise PrivacyError(f"{int((~torch.isfinite(norms)).sum())} of {batch} per-sample gradients "
                               "are not finite (NaN or inf loss?); nothing was added to the gradients")
        coefficients = (self.max_grad_norm / norms).clamp(max=1.0)  # a zero norm gives inf -> 1
        for i, (_, rule, recs) in enumerate(layers):
            rule.accumulate(recs, coefficients, plans[i], kept[i])
            kept[i] = None  # free as we go
        self._zero_missing_grads()
        self.last_plans = {name: plan for (name, _, _), plan in zip(layers, plans)}
        return norms.detach()

    def _zero_missing_grads(self) -> None:
        # a layer this batch did not reach still has a gradient (zero), so the optimiser noises it
        for rule in self._rules:
            for p in rule.module.parameters(recurse=False):
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)

    @staticmethod
    def _check_versions(pending) -> None:
        edited = sorted({name for name, _, recs in pending for r in recs if r.inputs._version != r.input_version})
        if edited:
            raise ConfigError(
                f"the input of layer(s) {', '.join(map(repr, edited))} was modified in place after the "
                "layer ran, so its per-sample gradients would be computed from the wrong values; "
                "make that operation out-of-place")


def add_noise_(params: Iterable[torch.Tensor], *, noise_multiplier: float, max_grad_norm: float,
               expected_batch_size: float, generator: torch.Generator | None = None) -> None:
    """``p.grad = (p.grad + N(0, (noise_multiplier * max_grad_norm)^2)) / expected_batch_size``.

    Applied to every parameter that requires grad; a missing ``.grad`` counts as zero (it still
    gets noise, so whether a layer was reached does not show). Divide by the *expected* batch
    size (sample rate x data set size, not necessarily an integer): with Poisson sampling the
    actual size is itself private.
    """
    problems: list[str] = []
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) \
            or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        problems.append(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    _check_positive("max_grad_norm", max_grad_norm, problems)
    _check_positive("expected_batch_size", expected_batch_size, problems)
    if problems:
        raise ConfigError(problems)
    std = float(noise_multiplier) * float(max_grad_norm)
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if std > 0:
            p.grad.add_(torch.normal(0.0, std, size=p.shape, generator=generator, device=p.device,
                                     dtype=p.dtype))
        p.grad.div_(expected_batch_size)
