"""Which network a federated task trains: the ``[model]`` section and its checks (no torch here).

A :class:`ModelConfig` names a built-in network or a user factory. The built-in networks:

* ``mlp``: fully connected layers of widths ``hidden`` with ReLU. Built for tabular data; on
  images it flattens each sample first, a cheap baseline for small images such as MedMNIST.
* ``densenet121``: MONAI's DenseNet121 (Huang et al. 2017) for image classification. Its five
  halvings need inputs of at least 32 per side, so smaller images (MedMNIST's 28x28) are
  interpolated up to 32 inside the model.
* ``unet`` (MONAI ``UNet``, residual units), ``basicunet`` (MONAI ``BasicUNet``) and
  ``segresnet`` (MONAI ``SegResNet``, Myronenko 2018) for segmentation, with one output channel
  per class. ``features`` sets their channel widths; the defaults are small enough for a CPU.
  Inputs whose sides are not a multiple of the network's total stride are padded (edge values
  repeated) and the output is cropped back, so the prediction always matches the input size.

``name="auto"`` picks ``mlp`` for tabular data, ``densenet121`` for image classification and
``unet`` for segmentation. :func:`model_problems` checks a config against a task without
building anything; :func:`securefed.models.build_model` builds it.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from securefed.data import TaskKind
from securefed.errors import ConfigError

if TYPE_CHECKING:
    from securefed.data import TaskSpec

__all__ = [
    "ModelName",
    "MODEL_NAMES",
    "ModelConfig",
    "model_problems",
    "resolved_name",
    "default_features",
    "stride_and_minimum",
]


class ModelName(StrEnum):
    """A built-in network (compares equal to its lower-case name)."""

    AUTO = "auto"
    MLP = "mlp"
    DENSENET121 = "densenet121"
    UNET = "unet"
    BASICUNET = "basicunet"
    SEGRESNET = "segresnet"


MODEL_NAMES: tuple[str, ...] = tuple(m.value for m in ModelName)
CLASSIFIERS = frozenset({ModelName.MLP, ModelName.DENSENET121})
SEGMENTERS = frozenset({ModelName.UNET, ModelName.BASICUNET, ModelName.SEGRESNET})
# Small widths that train in seconds on a CPU; MONAI's own defaults are 4-8 times wider.
_DEFAULT_FEATURES = {
    ModelName.UNET: (8, 16, 32),
    ModelName.BASICUNET: (8, 8, 16, 16, 32, 8),
    ModelName.SEGRESNET: (8, 16, 32),
}
DENSENET_MINIMUM_SIZE = 32  # five halvings: 32 -> 1 at the last transition
_BASICUNET_STRIDE = 16  # four max-poolings
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _canonical(text: str) -> str:
    return re.sub(r"[\s_\-]", "", text).lower()  # "BasicUNet", "basic_unet" -> "basicunet"


def _model_name(value: object, problems: list[str]) -> ModelName:
    if isinstance(value, ModelName):
        return value
    if isinstance(value, str):
        key = _canonical(value)
        for name in ModelName:
            if name.value == key:
                return name
        close = difflib.get_close_matches(key, MODEL_NAMES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"model name {value!r} is not a known network{hint}; choose one of "
                        f"{', '.join(MODEL_NAMES)}, or give factory = \"package.module:function\"")
    else:
        problems.append(f"model name must be a string (one of {', '.join(MODEL_NAMES)}), got {value!r}")
    return ModelName.AUTO


def _widths(value: object, field: str, what: str, problems: list[str]) -> tuple[int, ...] | None:
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return tuple(value)
    problems.append(f"{field} must be a non-empty list of ints >= 1 ({what}), got {value!r}")
    return None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The ``[model]`` section: a built-in network by ``name``, or a user ``factory``.

    ``name`` is case-insensitive (MONAI class names such as ``"DenseNet121"`` are accepted) and
    stored as a :class:`ModelName`. ``factory`` is ``"package.module:function"``, called as
    ``function(spec)`` with the task's :class:`~securefed.data.TaskSpec` and returning a
    ``torch.nn.Module``. ``hidden`` are the MLP's hidden widths. ``features`` are the channel
    widths of ``unet`` (one per level), ``basicunet`` (exactly six, as MONAI's BasicUNet) and
    ``segresnet`` (one per level, doubling: ``(f, 2f, 4f, ...)``); None takes a small default.
    """

    name: ModelName = ModelName.AUTO
    factory: str | None = None
    hidden: tuple[int, ...] = (64,)
    features: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        object.__setattr__(self, "name", _model_name(self.name, problems))
        if self.factory is not None:
            if not isinstance(self.factory, str) or not _FACTORY.fullmatch(self.factory.strip()):
                problems.append(f"factory must look like \"package.module:function\" (an importable module, "
                                f"a colon, a function taking the task spec), got {self.factory!r}")
            else:
                object.__setattr__(self, "factory", self.factory.strip())
                if self.name is not ModelName.AUTO:
                    problems.append(f"set either name ({self.name.value!r}) or factory ({self.factory!r}), "
                                    "not both: the factory builds the whole network")
        hidden = _widths(self.hidden, "hidden", "the mlp's hidden layer widths", problems)
        if hidden is not None:
            object.__setattr__(self, "hidden", hidden)
        if self.features is not None:
            features = _widths(self.features, "features", "convolution channel widths", problems)
            if features is not None:
                object.__setattr__(self, "features", features)
        if problems:
            raise ConfigError(problems)


def resolved_name(config: ModelConfig, spec: TaskSpec) -> ModelName:
    """The network ``config`` builds for ``spec`` (``auto`` resolved; AUTO itself for a factory)."""
    if config.factory is not None or config.name is not ModelName.AUTO:
        return config.name
    if spec.kind is TaskKind.SEGMENTATION:
        return ModelName.UNET
    return ModelName.MLP if spec.spatial_dims == 0 else ModelName.DENSENET121


def default_features(name: ModelName) -> tuple[int, ...] | None:
    """The channel widths a segmentation network gets when ``features`` is unset."""
    return _DEFAULT_FEATURES.get(name)


def stride_and_minimum(name: ModelName, features: tuple[int, ...]) -> tuple[int, int]:
    """(total stride, smallest side) of a segmentation network's input.

    Sides must be multiples of the total stride so the decoder's skip connections line up, and
    the coarsest level must keep at least 2 voxels per side: instance normalisation of a single
    voxel is undefined in training.
    """
    stride = _BASICUNET_STRIDE if name is ModelName.BASICUNET else 2 ** (len(features) - 1)
    return stride, 2 * stride


def _spec_problems(spec: TaskSpec) -> list[str]:
    problems = []
    if spec.spatial_dims not in (0, 2, 3):
        problems.append(f"the task has spatial_dims={spec.spatial_dims}; models support 0 (tabular), 2 or 3")
    elif len(spec.input_shape) != (1 if spec.spatial_dims == 0 else spec.spatial_dims + 1):
        problems.append(f"the task's input shape {spec.input_shape} does not fit spatial_dims="
                        f"{spec.spatial_dims}: expected (features,) or (channels, *{spec.spatial_dims} sides)")
    if spec.num_classes < 2:
        problems.append(f"the task has num_classes={spec.num_classes}; a model needs at least 2 classes "
                        "(segmentation counts the background)")
    return problems


def _features_problems(name: ModelName, features: tuple[int, ...] | None) -> list[str]:
    if features is None:
        return []
    if name in (ModelName.MLP, ModelName.DENSENET121):
        return [f"features applies to unet, basicunet and segresnet, not {name.value} "
                f"({'use hidden for the mlp widths' if name is ModelName.MLP else 'its widths are fixed'}); "
                "remove features"]
    if name is ModelName.UNET and len(features) < 2:
        return [f"unet needs at least 2 feature widths (one per level, e.g. (8, 16, 32)), got {features}"]
    if name is ModelName.BASICUNET and len(features) != 6:
        return [f"basicunet needs exactly 6 feature widths (as MONAI's BasicUNet, e.g. "
                f"{_DEFAULT_FEATURES[ModelName.BASICUNET]}), got {len(features)}: {features}"]
    if name is ModelName.SEGRESNET and any(f != features[0] * 2 ** i for i, f in enumerate(features)):
        doubled = tuple(features[0] * 2 ** i for i in range(len(features)))
        return [f"segresnet widths double at each level (init_filters, 2*init_filters, ...), got {features}; "
                f"use e.g. {doubled}"]
    return []


def model_problems(config: ModelConfig, spec: TaskSpec) -> list[str]:
    """Every reason ``config`` cannot model ``spec``, found without torch (empty when it fits).

    Checks that the network suits the task (a segmentation network for segmentation, a
    classifier for classification, images for the convolutional networks) and that
    ``features`` suit the network. A factory's own network is checked when it is built.
    """
    problems = _spec_problems(spec)
    if config.factory is not None:
        return problems
    name = resolved_name(config, spec)
    kind = spec.kind.value
    if spec.kind is TaskKind.SEGMENTATION and spec.spatial_dims == 0:
        problems.append("a segmentation task needs images (spatial_dims 2 or 3), but the task is tabular")
    elif name in SEGMENTERS and spec.kind is not TaskKind.SEGMENTATION:
        problems.append(f"model {name.value!r} is a segmentation network but the task is {kind}; use "
                        f"name = \"{'mlp' if spec.spatial_dims == 0 else 'densenet121'}\" or \"auto\"")
    elif name in CLASSIFIERS and spec.kind is not TaskKind.CLASSIFICATION:
        problems.append(f"model {name.value!r} is a classification network but the task is {kind}; use "
                        "name = \"unet\", \"basicunet\", \"segresnet\" or \"auto\"")
    elif name is ModelName.DENSENET121 and spec.spatial_dims == 0:
        problems.append("model 'densenet121' needs images but the task is tabular; use name = \"mlp\" or \"auto\"")
    problems.extend(_features_problems(name, config.features))
    if name is ModelName.MLP and spec.spatial_dims > 0 and math.prod(spec.input_shape) * config.hidden[0] > 10**8:
        problems.append(f"an mlp on {spec.input_shape} images needs {math.prod(spec.input_shape) * config.hidden[0]:,} "
                        "weights in its first layer alone; use densenet121 (or \"auto\") for images this large")
    return problems
