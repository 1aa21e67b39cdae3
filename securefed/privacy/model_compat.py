"""Make a PyTorch / MONAI model trainable with DP-SGD, and say exactly what was changed and why.

DP-SGD (Abadi et al. 2016) clips each sample's gradient before adding noise, so a layer may only
look at one sample at a time and Opacus (Yousefpour et al. 2021) must be able to compute
per-sample gradients through it. Medical-imaging networks break this in two common ways:

* **BatchNorm** normalises a sample with statistics of the whole batch, so one patient's image
  changes another patient's gradient, and its running statistics are updated from raw data outside
  the noise. We replace every BatchNorm (trainable or frozen: a frozen BatchNorm in train mode still
  mixes samples) by GroupNorm (Wu & He 2018, "Group Normalization"), which normalises within one
  sample. The learned per-channel scale and shift are copied over.
* **In-place operations** (``nn.ReLU(inplace=True)``, MONAI's ``Act`` layers, in-place dropout)
  overwrite the output of the previous layer, which Opacus' full backward hooks wrap in a custom
  autograd function; autograd then refuses with "Output 0 of BackwardHookFunction is a view and is
  being modified inplace". Turning the flag off changes memory use only, not the function. MONAI's
  SegResNet ``ResBlock`` (Myronenko 2018) adds its residual in place inside ``forward``
  (``x += identity``); such a block gets an out-of-place forward, installed only after a probe
  input shows that it computes exactly what the installed MONAI version computes.

InstanceNorm drops its running statistics (a non-private summary of the data). All else that
Opacus rejects is reported per layer (qualified name, type, and what the user can do).

Group count. Wu & He found 32 groups the best fixed group count, and both extremes - one channel
per group (InstanceNorm) and one group (LayerNorm) - worse. The count must divide the channel
count, so by default a layer gets the largest divisor of its channel count that is at most 32 and
leaves at least two channels per group (64 channels -> 32 groups, 48 -> 24, 24 -> 12, 9 -> 3,
4 -> 2). Opacus' own fixer uses gcd(32, channels), which is 1 (LayerNorm) for any odd channel
count. An explicit ``groups=G`` gives each layer the largest divisor of its channels that is <= G.

Statically invisible problems (an in-place tensor operation inside some ``forward``, a parameter
used outside its own layer, a layer that mixes samples) only show when gradients are computed.
With ``example_input=`` a trial step on a throw-away copy runs Opacus' per-sample gradients and
checks, independently of Opacus, that (a) they add up to the batch gradient and (b) the first
sample's per-sample gradient equals its gradient computed alone by plain autograd. Dropout is put
in eval mode for the trial so that random masks cannot fake a mismatch.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from ..errors import ConfigError, MissingDependencyError

__all__ = [
    "TrialOutcome",
    "CompatibilityReport",
    "make_dp_compatible",
    "check_dp_compatible",
    "require_dp_compatible",
]

_DEFAULT_MAX_GROUPS = 32  # Wu & He 2018's best fixed group count
# Trial gradients are compared relatively, plus a floor of this many ulp of the whole model's
# gradient norm: normalisation layers can leave ~10 ulp of rounding on a tiny layer gradient.
_TRIAL_RTOL = 1e-3
_ROUNDING_ULPS = 1000.0
_FIX_HINT = "make_dp_compatible fixes this"
# MONAI blocks (module.qualname) whose forward adds the residual in place onto a hooked output.
_IN_PLACE_RESIDUAL_BLOCKS = frozenset({"monai.networks.blocks.segresnet_block.ResBlock"})
_BATCH_NORM = nn.modules.batchnorm._BatchNorm
_INSTANCE_NORM = nn.modules.instancenorm._InstanceNorm


class TrialOutcome(Enum):
    """What happened to the optional per-sample-gradient trial step."""

    NOT_REQUESTED = "not-requested"  # no example_input was given
    SKIPPED = "skipped"  # static problems remain; they must be fixed before a trial means anything
    PASSED = "passed"
    FAILED = "failed"  # the failures are listed in remaining_problems


@dataclass(frozen=True, kw_only=True)
class CompatibilityReport:
    """What was changed to make a model DP-SGD compatible, and what still stands in the way.

    Layers are named by qualified name (``model.get_submodule(name)``). ``group_counts[i]`` is the
    GroupNorm group count chosen for ``replaced_norms[i]``. Every entry of ``remaining_problems``
    names the layer, its type and a fix.
    """

    replaced_norms: tuple[str, ...] = ()
    group_counts: tuple[int, ...] = ()
    disabled_running_stats: tuple[str, ...] = ()
    disabled_inplace: tuple[str, ...] = ()
    out_of_place_blocks: tuple[str, ...] = ()
    remaining_problems: tuple[str, ...] = ()
    trial: TrialOutcome = TrialOutcome.NOT_REQUESTED

    @property
    def ok(self) -> bool:
        return not self.remaining_problems and self.trial is not TrialOutcome.FAILED

    def summary(self) -> str:
        lines = ["model is DP-SGD compatible" if self.ok else
                 f"model is NOT DP-SGD compatible: {len(self.remaining_problems)} problem(s) remain"]
        if self.replaced_norms:
            named = [f"{_show(n)} ({g} groups)" for n, g in zip(self.replaced_norms, self.group_counts)]
            lines.append(f"replaced {len(named)} BatchNorm layer(s) with GroupNorm: {_shorten(named)}")
        for names, what in ((self.disabled_running_stats, "dropped running statistics of"),
                            (self.disabled_inplace, "switched off inplace on"),
                            (self.out_of_place_blocks, "made the residual addition out-of-place in")):
            if names:
                lines.append(f"{what} {len(names)} layer(s): {_shorten([_show(n) for n in names])}")
        lines.append(f"per-sample-gradient trial step: {self.trial.value}")
        lines.extend(f"  - {p}" for p in self.remaining_problems)
        return "\n".join(lines)


def make_dp_compatible(
    model: nn.Module, *, groups: int | None = None, example_input: torch.Tensor | None = None
) -> tuple[nn.Module, CompatibilityReport]:
    """Return a fixed deep copy of ``model`` (the caller's model is untouched) and a report.

    BatchNorm becomes GroupNorm (``groups`` overrides the maximum group count), InstanceNorm drops
    its running statistics, in-place flags are switched off and known MONAI residual blocks that
    add in place get an out-of-place forward. The copy is then checked as Opacus will check it;
    with ``example_input`` (a batch of >= 2 samples, batch dimension first) a trial per-sample-
    gradient step runs on a throw-away copy. Remaining problems are reported, not raised: inspect
    ``report.ok`` or call :func:`require_dp_compatible`.
    """
    problems = _argument_problems(model, example_input)
    if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1):
        problems.append(f"groups must be a positive int (the maximum GroupNorm group count), got {groups!r}")
    if problems:
        raise ConfigError(problems)
    fixed = _copy(model)
    replaced, counts, no_stats, no_inplace, out_of_place = [], [], [], [], []
    for name, module in list(fixed.named_modules()):
        if isinstance(module, _BATCH_NORM) and not _uninitialised(module):  # lazy: reported below
            group_norm = _group_norm_like(module, groups)
            parent, _, child = name.rpartition(".")
            setattr(fixed.get_submodule(parent), child, group_norm)
            replaced.append(name)
            counts.append(group_norm.num_groups)
        elif isinstance(module, _INSTANCE_NORM) and module.track_running_stats:
            module.track_running_stats = False  # the layer now uses per-sample statistics always
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(module, buffer, None)
            no_stats.append(name)
        if _is_inplace(module):
            module.inplace = False
            no_inplace.append(name)
    for name, module in fixed.named_modules():  # after the norms, so the probe sees the final block
        if _adds_residual_in_place(module) and _make_residual_out_of_place(module):
            out_of_place.append(name)
    static = _static_problems(fixed)
    trial, trial_problems = _maybe_trial(fixed, example_input, static)
    return fixed, CompatibilityReport(
        replaced_norms=tuple(replaced), group_counts=tuple(counts),
        disabled_running_stats=tuple(no_stats), disabled_inplace=tuple(no_inplace),
        out_of_place_blocks=tuple(out_of_place), remaining_problems=tuple(static + trial_problems),
        trial=trial)


def check_dp_compatible(
    model: nn.Module, *, example_input: torch.Tensor | None = None
) -> CompatibilityReport:
    """Report every DP-SGD problem of ``model`` as it is, without changing it.

    With ``example_input`` the trial step runs on a throw-away copy if no static problem remains.
    """
    problems = _argument_problems(model, example_input)
    if problems:
        raise ConfigError(problems)
    static = _static_problems(model)
    trial, trial_problems = _maybe_trial(model, example_input, static)
    return CompatibilityReport(remaining_problems=tuple(static + trial_problems), trial=trial)


def require_dp_compatible(model: nn.Module, *, example_input: torch.Tensor | None = None) -> None:
    """Raise :class:`~securefed.errors.ConfigError` listing every problem at once, if there is any."""
    report = check_dp_compatible(model, example_input=example_input)
    if not report.ok:
        raise ConfigError(list(report.remaining_problems))


# --- fixing ---------------------------------------------------------------------------------

def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the caller
        raise ConfigError(
            f"the model could not be deep-copied ({type(exc).__name__}); make_dp_compatible never "
            "edits the caller's model, so make it copyable (e.g. remove lambdas or open handles "
            "held as attributes)") from exc


def _choose_groups(channels: int, max_groups: int | None) -> int:
    if max_groups is None:  # <= 32 groups and >= 2 channels per group (1 channel: 1 group)
        cap = min(_DEFAULT_MAX_GROUPS, max(1, channels // 2))
    else:
        cap = min(max_groups, channels)
    return max(d for d in range(1, cap + 1) if channels % d == 0)


def _group_norm_like(norm: nn.modules.batchnorm._BatchNorm, max_groups: int | None) -> nn.GroupNorm:
    channels = norm.num_features
    group_norm = nn.GroupNorm(_choose_groups(channels, max_groups), channels, eps=norm.eps,
                              affine=norm.affine)
    if norm.affine:
        group_norm.to(device=norm.weight.device, dtype=norm.weight.dtype)
        for mine, theirs in ((group_norm.weight, norm.weight), (group_norm.bias, norm.bias)):
            with torch.no_grad():
                mine.copy_(theirs)
            mine.requires_grad_(theirs.requires_grad)  # a frozen BatchNorm stays frozen
    return group_norm.train(norm.training)


def _uninitialised(module: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False))


def _is_inplace(module: nn.Module) -> bool:  # nn.ReLU, nn.Dropout, MONAI's Swish / Mish, ...
    return getattr(module, "inplace", False) is True


def _adds_residual_in_place(module: nn.Module) -> bool:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}" in _IN_PLACE_RESIDUAL_BLOCKS and "forward" not in vars(module)


def _out_of_place_residual_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # pre-activation residual block: norm, act, conv, norm, act, conv, then add the input
    return self.conv2(self.act(self.norm2(self.conv1(self.act(self.norm1(x)))))) + x


def _make_residual_out_of_place(block: nn.Module) -> bool:
    """Install the out-of-place forward if it matches the block's own on a probe input."""
    try:
        weight = next(p for p in block.parameters() if p.dim() > 2)  # conv1: (out, in, *kernel)
        probe = torch.randn((2, weight.shape[1]) + (5,) * (weight.dim() - 2),
                            generator=torch.Generator().manual_seed(0)).to(weight)
        replacement = functools.partial(_out_of_place_residual_forward, block)  # survives pickling
        training = block.training
        with torch.no_grad():
            same = torch.allclose(block.eval().forward(probe.clone()), replacement(probe.clone()))
        block.train(training)
    except Exception:  # noqa: BLE001 - a MONAI version with another layout: leave it, report it
        return False
    if same:  # an instance attribute: parameter names and state_dict stay unchanged
        block.forward = replacement
    return same


# --- static checks --------------------------------------------------------------------------

def _show(name: str) -> str:
    return f"'{name}'" if name else "'<model>'"


def _shorten(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _layer(name: str, module: nn.Module) -> str:
    return f"layer {_show(name)} ({type(module).__name__})"


def _trainable(module: nn.Module) -> bool:  # Opacus hooks a layer that has own trainable parameters
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _argument_problems(model: object, example_input: object) -> list[str]:
    problems = []
    if not isinstance(model, nn.Module):
        problems.append(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        problems.append(f"example_input must be a torch.Tensor batch, got {type(example_input).__name__}")
    elif example_input is not None and (example_input.dim() < 1 or example_input.shape[0] < 2):
        problems.append(f"example_input must be a batch of at least 2 samples (batch dimension first) "
                        f"so the trial can check that samples do not mix, got shape "
                        f"{tuple(example_input.shape)}")
    return problems


def _static_problems(model: nn.Module) -> list[str]:
    validator = _opacus().validators.ModuleValidator
    problems, attributed = [], Counter()
    if not model.training:
        problems.append("the model is in eval mode; call model.train() before DP training "
                        "(Opacus computes per-sample gradients only in train mode)")
        attributed["Model needs to be in training mode"] += 1
    for name, module in model.named_modules():
        opacus_errors = []
        if _trainable(module) and type(module) in validator.VALIDATORS:
            opacus_errors = validator.VALIDATORS[type(module)](module)
            attributed.update(str(e) for e in opacus_errors)
        problems.extend(_own_problems(name, module) or [_from_opacus(name, module, e) for e in opacus_errors])
    # Cross-check with Opacus' whole-model validator so that nothing it rejects goes unreported,
    # even if a future Opacus adds checks that are not per layer.
    unattributed = Counter(str(e) for e in validator.validate(model, strict=False)) - attributed
    problems.extend(f"Opacus' validator rejects the model: {text}" for text in unattributed.elements())
    return problems


def _own_problems(name: str, module: nn.Module) -> list[str]:
    layer = _layer(name, module)
    if isinstance(module, _BATCH_NORM):
        if _uninitialised(module):
            return [f"{layer} is a lazy BatchNorm that has not seen data yet, so its channel count is "
                    "unknown; run one forward pass before make_dp_compatible, or use GroupNorm"]
        return [f"{layer} normalises each sample with statistics of the whole batch, so one "
                "sample changes another's gradient and the running statistics leak data; replace "
                f"it with GroupNorm ({_FIX_HINT})"]
    problems = []
    if isinstance(module, _INSTANCE_NORM) and module.track_running_stats:
        problems.append(f"{layer} tracks running statistics, a summary of the training data that "
                        f"DP-SGD does not protect; build it with track_running_stats=False ({_FIX_HINT})")
    if _is_inplace(module):
        problems.append(f"{layer} works in place, which breaks Opacus' backward hooks when it "
                        f"overwrites a hooked layer's output; build it with inplace=False ({_FIX_HINT})")
    if _adds_residual_in_place(module):
        problems.append(f"{layer} adds its residual in place (x += identity) onto a layer output "
                        "that Opacus hooks, which fails in the first forward pass; subclass it with "
                        f"x = x + identity ({_FIX_HINT} where the block matches MONAI's layout)")
    buffers = _unreported_buffers(name, module) if _trainable(module) else []
    if buffers:
        problems.append(
            f"{layer} has trainable parameters and buffers ({', '.join(buffers)}); Opacus cannot "
            "compute per-sample gradients through it and the buffers would be updated from the "
            "data without noise; remove the buffers (e.g. torch.nn.utils.spectral_norm keeps its "
            "power-iteration vectors in buffers), or freeze the layer with requires_grad_(False)")
    return problems


def _unreported_buffers(name: str, module: nn.Module) -> list[str]:
    # Opacus rejects a trainable layer if it or any sublayer holds a buffer; buffers of norm
    # layers are left out because those layers get their own, more specific, problem.
    return [f"{sub_name}.{buffer}" if sub_name else buffer
            for sub_name, sub in module.named_modules(prefix=name)
            if not isinstance(sub, (_BATCH_NORM, _INSTANCE_NORM))
            for buffer, value in sub.named_buffers(recurse=False) if value is not None]


def _from_opacus(name: str, module: nn.Module, error: Exception) -> str:
    if isinstance(error, _opacus().validators.errors.ShouldReplaceModuleError):
        fix = ("replace it with Opacus' drop-in replacement (opacus.layers DPLSTM, DPGRU, "
               "DPMultiheadAttention; opacus.validators.ModuleValidator.fix does this)")
    else:
        fix = "change or freeze the layer as Opacus describes"
    reason = str(error).split(". ")[0].rstrip(".")
    return f"{_layer(name, module)} is rejected by Opacus ({reason}); {fix}"


def _opacus():  # noqa: ANN202 - returns the module
    try:
        import opacus
        import opacus.validators  # registers Opacus' per-layer validators
    except ImportError as exc:
        raise MissingDependencyError(
            "DP-SGD model checks need opacus; install it with `pip install opacus`") from exc
    return opacus


# --- trial per-sample-gradient step ---------------------------------------------------------

def _maybe_trial(
    model: nn.Module, example_input: torch.Tensor | None, static: list[str]
) -> tuple[TrialOutcome, list[str]]:
    if example_input is None:
        return TrialOutcome.NOT_REQUESTED, []
    if static:
        return TrialOutcome.SKIPPED, []
    problems = _trial_problems(model, example_input)
    return (TrialOutcome.FAILED if problems else TrialOutcome.PASSED), problems


def _trial_copy(model: nn.Module) -> nn.Module:
    trial = _copy(model).train()
    for module in trial.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()  # dropout masks differ between runs and would fake a mismatch
    return trial


def _output_tensors(output: object) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        yield output
    elif isinstance(output, (dict, list, tuple)):
        for value in output.values() if isinstance(output, dict) else output:
            yield from _output_tensors(value)


def _trial_loss(output: object) -> torch.Tensor:
    # A fixed random projection of every output, the same for every sample: unlike output.sum()
    # it has non-zero gradients through softmax heads, and it is a sum of per-sample losses.
    generator = torch.Generator().manual_seed(0)
    terms = [(t * torch.randn(t.shape[1:], generator=generator).to(t)).sum() for t in _output_tensors(output)]
    if not terms:
        raise TypeError("the model returned no floating-point tensor")
    return torch.stack(terms).sum()


def _by_layer(model: nn.Module, names: list[str]) -> str:
    layers: dict[str, list[str]] = {}
    for name in names:
        owner, _, param = name.rpartition(".")
        layers.setdefault(owner, []).append(param)
    return "; ".join(f"{_layer(owner, model.get_submodule(owner))} parameters {params}"
                     for owner, params in layers.items())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    scale = max(torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item())
    return torch.linalg.vector_norm(a - b).item() <= _TRIAL_RTOL * scale + atol


def _trial_problems(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    trial = _trial_copy(model)
    try:
        wrapped = _opacus().GradSampleModule(trial, batch_first=True, loss_reduction="sum", strict=True)
    except Exception as exc:  # noqa: BLE001 - any failure is reported, none is expected
        return [f"trial step: Opacus could not wrap the model ({_first_line(exc)}); fix the layers it names"]
    names = {module: name for name, module in trial.named_modules()}
    running: list[str] = []  # qualified names of the modules whose forward is executing

    def leave(*_: object) -> None:  # returns None: a hook's return value would replace the output
        running.pop()

    hooks = [h for m in names for h in (
        m.register_forward_pre_hook(lambda module, _: running.append(names[module])), m.register_forward_hook(leave))]
    try:
        output = wrapped(example_input)
    except Exception as exc:  # noqa: BLE001
        where = running[-1] if running else ""
        hint = (" An in-place tensor operation in its forward (x += y, F.relu(x, inplace=True), "
                "x.relu_()) overwrites a layer output that Opacus hooks; use the out-of-place form."
                if "inplace" in str(exc) else "")
        return [f"trial step: {_layer(where, trial.get_submodule(where))} failed in forward with "
                f"{_first_line(exc)}.{hint}"]
    finally:
        for hook in hooks:
            hook.remove()
    try:
        with warnings.catch_warnings(action="ignore", category=UserWarning):  # Opacus' hook notices
            _trial_loss(output).backward()
    except Exception as exc:  # noqa: BLE001
        return [f"trial step: the backward pass failed with {_first_line(exc)}; look for in-place "
                "operations or parameters shared between layers"]
    return _gradient_problems(model, example_input, trial)


def _gradient_problems(model: nn.Module, example_input: torch.Tensor, trial: nn.Module) -> list[str]:
    batch = example_input.shape[0]
    trainable = [(n, p) for n, p in trial.named_parameters() if p.requires_grad]
    eps = torch.finfo(trainable[0][1].dtype).eps if trainable else 0.0
    floor = _ROUNDING_ULPS * eps * sum(p.grad.square().sum().item() for _, p in trainable
                                       if p.grad is not None) ** 0.5
    missing = [n for n, p in trainable if getattr(p, "grad_sample", None) is None]
    wrong_shape = [n for n, p in trainable if n not in missing and p.grad_sample.shape[0] != batch]
    unsummed = [n for n, p in trainable if n not in missing + wrong_shape and not _close(
        p.grad_sample.sum(0), torch.zeros_like(p) if p.grad is None else p.grad, floor)]
    problems = []
    if missing:
        problems.append(
            f"trial step: Opacus computed no per-sample gradient for {_by_layer(trial, missing)}; "
            "a parameter used outside its own layer's forward (weight tying, a parent using a "
            "child's weight) or not used at all cannot be trained with DP-SGD; restructure it or "
            "freeze it with requires_grad_(False)")
    if wrong_shape or unsummed:
        problems.append(
            "trial step: per-sample gradients do not add up to the batch gradient for "
            f"{_by_layer(trial, wrong_shape + unsummed)}; the layer probably takes more than one "
            "tensor input or reuses its parameters in a way Opacus' per-sample rule does not model; "
            "register a grad sampler for it or freeze it")
    checked = [(n, p) for n, p in trainable if n not in missing + wrong_shape + unsummed]
    try:  # the first sample alone, through plain autograd on an unhooked copy
        alone = _trial_copy(model)
        params = dict(alone.named_parameters())
        grads = torch.autograd.grad(_trial_loss(alone(example_input[:1])),
                                    [params[n] for n, _ in checked], allow_unused=True) if checked else ()
    except Exception as exc:  # noqa: BLE001
        return problems + [f"trial step: the model failed on a batch of one sample ({_first_line(exc)}); "
                           "DP-SGD with Poisson sampling makes batches of any size, 1 included"]
    mixed = [n for (n, p), g in zip(checked, grads)
             if not _close(p.grad_sample[0], torch.zeros_like(p) if g is None else g, floor / batch)]
    if mixed:
        problems.append(
            "trial step: the per-sample gradient of the batch's first sample differs from its "
            f"gradient computed alone for {_by_layer(trial, mixed)}; some layer mixes samples "
            "across the batch (batch statistics, cross-sample attention) or the forward pass is "
            "random; make every layer act on one sample at a time")
    return problems
