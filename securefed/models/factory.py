"""Build a task's model: DP-SGD compatible, checked against the data's shape, seeded (torch adapter).

Every model - built-in or from a user factory - goes through
:func:`securefed.privacy.make_dp_compatible` (BatchNorm becomes GroupNorm, in-place activations
are switched off) and then a trial forward pass, in training mode, on a zero batch of two
samples shaped like the task's inputs; a model whose output does not have the shape the task's
loss needs is refused before any site trains. A factory's model, whose layers securefed does
not know, also gets the per-sample-gradient trial step of
:func:`securefed.privacy.check_dp_compatible`, run in float64 on a copy: in float32, rounding in
deep convolutional stacks can exceed the trial's tolerance and refuse a correct model. The
built-in networks pass that trial in their tests.

Parameters are initialised from ``seed`` inside a forked torch RNG, so every site that builds
the model from the same seed starts from the same parameters and the caller's RNG is untouched.
"""

from __future__ import annotations

import copy
import difflib
import importlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from securefed.data import TaskKind
from securefed.errors import ConfigError
from securefed.privacy.model_compat import check_dp_compatible, make_dp_compatible

from .config import ModelConfig, model_problems, resolved_name
from .networks import build_network

if TYPE_CHECKING:
    from securefed.data import TaskSpec

__all__ = ["build_model", "load_factory"]

_TRIAL_BATCH = 2


def load_factory(path: str):  # noqa: ANN201 - returns the user's callable
    """Import ``"package.module:function"`` and return the function (ConfigError naming the fix)."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"factory {path!r}: module {module_name!r} cannot be imported ({exc}); install it "
                          "or put its folder on PYTHONPATH") from exc
    except Exception as exc:  # noqa: BLE001 - any failure while importing user code means the same
        raise ConfigError(f"factory {path!r}: importing module {module_name!r} failed with "
                          f"{type(exc).__name__}: {exc}") from exc
    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            known = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"factory {path!r}: {module_name!r} has no attribute {attribute!r}{hint}; name a "
                              "function defined in that module")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"factory {path!r} is a {type(target).__name__}, not a function; name a function "
                          "that takes the task spec and returns a torch.nn.Module")
    return target


def _construct(config: ModelConfig, spec: TaskSpec) -> tuple[nn.Module, str]:
    if config.factory is None:
        name = resolved_name(config, spec)
        return build_network(name, config, spec), name.value
    function = load_factory(config.factory)
    try:
        model = function(spec)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code failed; say where
        raise ConfigError(f"factory {config.factory!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory {config.factory!r} returned a {type(model).__name__}; it must return a "
                          "torch.nn.Module")
    return model, config.factory


def _expected_output(spec: TaskSpec) -> tuple[int, ...]:
    if spec.kind is TaskKind.SEGMENTATION:
        return (_TRIAL_BATCH, spec.num_classes, *spec.input_shape[1:])
    return (_TRIAL_BATCH, spec.num_classes)


def _trial_forward(model: nn.Module, label: str, spec: TaskSpec) -> None:
    shape = (_TRIAL_BATCH, *spec.input_shape)
    wanted = _expected_output(spec)
    what = "per-voxel class scores" if spec.kind is TaskKind.SEGMENTATION else "one score per class"
    reference = next(iter(model.parameters()), None)  # a factory may build in another dtype or device
    zeros = torch.zeros(shape) if reference is None else torch.zeros(shape, dtype=reference.dtype,
                                                                     device=reference.device)
    try:
        with torch.no_grad():
            output = model(zeros)
    except Exception as exc:  # noqa: BLE001 - reported with the shapes involved
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
        raise ConfigError(f"model {label!r} fails on inputs shaped {shape} (batch, *sample) with {reason}; "
                          "choose a model that fits the data, or resize the data (image_size)") from exc
    got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if got == wanted:
        return
    if isinstance(got, tuple) and len(got) == len(wanted) and got[2:] == wanted[2:]:
        fix = f"give the network {spec.num_classes} output channels"
    elif isinstance(got, tuple) and len(got) == len(wanted):
        fix = "keep the input's spatial size through the network (pad its convolutions)"
    else:
        fix = "return a single tensor of that shape"
    raise ConfigError(f"model {label!r} maps inputs shaped {shape} to {got}, but the {spec.kind.value} task "
                      f"with {spec.num_classes} classes needs {wanted} ({what}); {fix}")


def _gradient_trial(model: nn.Module, label: str, spec: TaskSpec) -> None:
    device = next(iter(model.parameters())).device
    example = torch.randn((_TRIAL_BATCH, *spec.input_shape), dtype=torch.float64, device=device)
    report = check_dp_compatible(copy.deepcopy(model).double(), example_input=example)
    if not report.ok:
        raise ConfigError([f"model {label!r} cannot be trained with DP-SGD: {p}" for p in report.remaining_problems])


def build_model(config: ModelConfig, spec: TaskSpec, *, seed: int) -> nn.Module:
    """Build ``config``'s network for ``spec``: DP-SGD compatible, shape-checked and seeded.

    Raises ConfigError when the config does not suit the task (:func:`model_problems`), a factory
    cannot be imported or returns no ``nn.Module``, a layer cannot be made DP-SGD compatible, or
    the model's output does not fit the task. The model is returned in training mode (built-in
    networks on the CPU; a factory's where the factory put it).
    """
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"config must be a ModelConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be an int in [0, 2**63), got {seed!r}")
    problems = model_problems(config, spec)
    if problems:
        raise ConfigError(problems)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, label = _construct(config, spec)
        model.train()
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"model {label!r} has no trainable parameters; federated training needs some")
        fixed, report = make_dp_compatible(model)
        if not report.ok:
            raise ConfigError([f"model {label!r} cannot be trained with DP-SGD: {p}"
                               for p in report.remaining_problems])
        _trial_forward(fixed, label, spec)
        if config.factory is not None:
            _gradient_trial(fixed, label, spec)
    return fixed
