"""The built-in networks (torch and MONAI adapter) and the fronts that fit them to the data's size.

Two parameter-free wrappers adapt a network to inputs it cannot take as they are, sample by
sample (so DP-SGD's per-sample gradients are unaffected):

* :class:`UpsampledInput` interpolates images smaller than a classifier's minimum side up to
  it (bilinear / trilinear). DenseNet121 halves its input five times and needs >= 32 per side.
* :class:`PaddedInput` pads each side of a segmentation input up to a multiple of the network's
  total stride (edge values repeated) and crops the output back, so the per-voxel prediction is
  aligned with the input and its labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import DENSENET_MINIMUM_SIZE, ModelConfig, ModelName, default_features, stride_and_minimum

if TYPE_CHECKING:
    from securefed.data import TaskSpec

__all__ = ["UpsampledInput", "PaddedInput", "build_network"]

_INTERPOLATION = {2: "bilinear", 3: "trilinear"}
_SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4)  # MONAI's default depth per level; deeper levels repeat the last
_SEGRESNET_MAX_GROUPS = 8  # MONAI's default GroupNorm group count


class UpsampledInput(nn.Module):
    """Interpolate every side shorter than ``minimum`` up to ``minimum``, then run ``net``."""

    def __init__(self, net: nn.Module, *, minimum: int) -> None:
        super().__init__()
        self.net = net
        self.minimum = minimum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sides = tuple(x.shape[2:])
        target = tuple(max(side, self.minimum) for side in sides)
        if target != sides:
            x = F.interpolate(x, size=target, mode=_INTERPOLATION[len(sides)], align_corners=False)
        return self.net(x)


class PaddedInput(nn.Module):
    """Pad every side up to a multiple of ``stride`` (and at least ``minimum``), run ``net``, crop back."""

    def __init__(self, net: nn.Module, *, stride: int, minimum: int) -> None:
        super().__init__()
        self.net = net
        self.stride, self.minimum = stride, minimum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sides = tuple(x.shape[2:])
        target = tuple(max(self.minimum, math.ceil(side / self.stride) * self.stride) for side in sides)
        if target == sides:
            return self.net(x)
        padding: list[int] = []
        for side, wanted in zip(reversed(sides), reversed(target)):  # F.pad lists the last side first
            padding.extend((0, wanted - side))
        out = self.net(F.pad(x, padding, mode="replicate"))
        return out[(slice(None), slice(None), *(slice(0, side) for side in sides))]


def _needs_padding(sides: Sequence[int], stride: int, minimum: int) -> bool:
    return any(side % stride or side < minimum for side in sides)


def _largest_divisor(channels: int, limit: int) -> int:
    return max(d for d in range(1, min(channels, limit) + 1) if channels % d == 0)


def _mlp(config: ModelConfig, spec: TaskSpec) -> nn.Module:
    widths = (math.prod(spec.input_shape), *config.hidden)
    layers: list[nn.Module] = [nn.Flatten()]  # images: one vector per sample; tabular: unchanged
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], spec.num_classes))
    return nn.Sequential(*layers)


def _densenet121(spec: TaskSpec) -> nn.Module:
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=spec.spatial_dims, in_channels=spec.input_shape[0], out_channels=spec.num_classes)
    if min(spec.input_shape[1:]) < DENSENET_MINIMUM_SIZE:
        return UpsampledInput(net, minimum=DENSENET_MINIMUM_SIZE)
    return net


def _segmenter(name: ModelName, features: tuple[int, ...], spec: TaskSpec) -> nn.Module:
    from monai.networks.nets import BasicUNet, SegResNet, UNet

    common = {"spatial_dims": spec.spatial_dims, "in_channels": spec.input_shape[0], "out_channels": spec.num_classes}
    if name is ModelName.UNET:
        net: nn.Module = UNet(channels=features, strides=(2,) * (len(features) - 1), num_res_units=1, **common)
    elif name is ModelName.BASICUNET:
        net = BasicUNet(features=features, **common)
    else:
        levels = len(features)
        down = tuple(_SEGRESNET_BLOCKS_DOWN[min(i, len(_SEGRESNET_BLOCKS_DOWN) - 1)] for i in range(levels))
        groups = _largest_divisor(features[0], _SEGRESNET_MAX_GROUPS)  # must divide every level's width
        net = SegResNet(init_filters=features[0], blocks_down=down, blocks_up=(1,) * (levels - 1),
                        norm=("GROUP", {"num_groups": groups}), **common)
    stride, minimum = stride_and_minimum(name, features)
    if _needs_padding(spec.input_shape[1:], stride, minimum):
        return PaddedInput(net, stride=stride, minimum=minimum)
    return net


def build_network(name: ModelName, config: ModelConfig, spec: TaskSpec) -> nn.Module:
    """A fresh, randomly initialised ``name`` network for ``spec`` (``name`` already resolved)."""
    if name is ModelName.MLP:
        return _mlp(config, spec)
    if name is ModelName.DENSENET121:
        return _densenet121(spec)
    features = config.features or default_features(name)
    assert features is not None, name  # every segmentation network has defaults
    return _segmenter(name, features, spec)
