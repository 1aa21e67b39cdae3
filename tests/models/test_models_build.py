"""build_model: every built-in network in 2D and 3D, the size fronts, seeding, DP-SGD compatibility."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from securefed.data import TaskKind, TaskSpec
from securefed.errors import ConfigError
from securefed.models import ModelConfig, build_model
from securefed.models.networks import PaddedInput, UpsampledInput
from securefed.privacy.model_compat import check_dp_compatible

torch.set_num_threads(1)


def _seg(shape: tuple[int, ...], classes: int = 2) -> TaskSpec:
    return TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=shape, spatial_dims=len(shape) - 1, num_classes=classes)


def _cls(shape: tuple[int, ...], classes: int = 3) -> TaskSpec:
    dims = 0 if len(shape) == 1 else len(shape) - 1
    return TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=shape, spatial_dims=dims, num_classes=classes)


def _output(model: nn.Module, spec: TaskSpec, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(batch, *spec.input_shape))


def _passes_gradient_trial(model: nn.Module, spec: TaskSpec) -> bool:
    # float64: in float32 the trial's rounding tolerance is too tight for deep conv stacks
    g = torch.Generator().manual_seed(0)
    example = torch.randn((2, *spec.input_shape), generator=g, dtype=torch.float64)
    report = check_dp_compatible(copy.deepcopy(model).double(), example_input=example)
    assert report.ok, report.summary()
    return report.ok


CASES = [
    ("mlp", _cls((30,), 2)),
    ("mlp", _cls((1, 12, 12))),  # flattened images
    ("unet", _seg((1, 32, 32))),
    ("unet", _seg((1, 16, 16, 16))),
    ("basicunet", _seg((1, 32, 32))),
    ("basicunet", _seg((1, 16, 16, 16))),  # padded to 32: BasicUNet's 1-voxel bottleneck cannot be normalised
    ("segresnet", _seg((1, 32, 32), 3)),
    ("segresnet", _seg((2, 16, 16, 16))),
]


@pytest.mark.parametrize("name, spec", CASES, ids=[f"{n}-{len(s.input_shape) - 1 or 0}d" for n, s in CASES])
def test_default_networks_build_fit_and_pass_the_per_sample_gradient_trial(name: str, spec: TaskSpec) -> None:
    model = build_model(ModelConfig(name=name), spec, seed=0)
    assert model.training
    expected = (2, spec.num_classes, *spec.input_shape[1:]) if spec.kind is TaskKind.SEGMENTATION \
        else (2, spec.num_classes)
    assert tuple(_output(model, spec).shape) == expected
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert _passes_gradient_trial(model, spec)


@pytest.mark.parametrize("spec", [_cls((1, 28, 28), 9), _cls((1, 16, 16, 16), 2)], ids=["2d-28", "3d-16"])
def test_densenet121_upsamples_small_images_to_32(spec: TaskSpec) -> None:
    model = build_model(ModelConfig(name="DenseNet121"), spec, seed=0)
    assert isinstance(model, UpsampledInput) and model.minimum == 32
    x = torch.randn(2, *spec.input_shape)
    mode = "bilinear" if spec.spatial_dims == 2 else "trilinear"
    model.eval()
    with torch.no_grad():
        direct = model.net(F.interpolate(x, size=(32,) * spec.spatial_dims, mode=mode, align_corners=False))
        torch.testing.assert_close(model(x), direct)
    assert direct.shape == (2, spec.num_classes)
    # BatchNorm became GroupNorm, as DP-SGD needs
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if spec.spatial_dims == 3:  # the gradient trial of the 2D network takes twice as long; same layers
        assert _passes_gradient_trial(model.train(), spec)


def test_densenet121_at_32_needs_no_front() -> None:
    assert not isinstance(build_model(ModelConfig(), _cls((3, 32, 32), 2), seed=0), UpsampledInput)


def test_segmentation_input_is_padded_to_the_stride_and_cropped_back() -> None:
    spec = _seg((1, 30, 29), 3)
    model = build_model(ModelConfig(name="unet"), spec, seed=0)
    assert isinstance(model, PaddedInput) and model.stride == 4
    x = torch.randn(2, 1, 30, 29)
    with torch.no_grad():
        out = model(x)
        padded = model.net(F.pad(x, (0, 3, 0, 2), mode="replicate"))
    assert out.shape == (2, 3, 30, 29)
    torch.testing.assert_close(out, padded[:, :, :30, :29])
    assert not isinstance(build_model(ModelConfig(name="unet"), _seg((1, 32, 32)), seed=0), PaddedInput)


def test_small_features_build() -> None:
    spec = _seg((1, 16, 16))
    for name, features in (("unet", (2, 4)), ("basicunet", (2, 2, 2, 2, 2, 2)), ("segresnet", (2, 4))):
        model = build_model(ModelConfig(name=name, features=features), spec, seed=0)
        assert tuple(_output(model, spec).shape) == (2, 2, 16, 16)


def test_parameters_are_determined_by_the_seed_and_leave_the_global_rng_alone() -> None:
    spec = _seg((1, 16, 16))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = (build_model(ModelConfig(name="segresnet"), spec, seed=s) for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_config_problems_and_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="segmentation network"):
        build_model(ModelConfig(name="unet"), _cls((1, 32, 32)), seed=0)
    with pytest.raises(ConfigError, match="seed must be an int"):
        build_model(ModelConfig(), _cls((30,)), seed=-1)
    with pytest.raises(ConfigError, match="ModelConfig"):
        build_model({"name": "mlp"}, _cls((30,)), seed=0)


# --- user factories ---------------------------------------------------------------------------

FACTORIES = '''
import torch
from torch import nn

def good(spec):
    return nn.Sequential(nn.Conv2d(spec.input_shape[0], 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Conv2d(4, spec.num_classes, 1))

def three_channels(spec):
    return nn.Conv2d(spec.input_shape[0], 3, 1)

def shrinks(spec):
    return nn.Conv2d(spec.input_shape[0], spec.num_classes, 3)  # no padding: 16x16 -> 14x14

def too_small_for(spec):
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=8), nn.Conv2d(2, 2, 3))

class MixesSamples(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.conv = nn.Conv2d(spec.input_shape[0], spec.num_classes, 1)
    def forward(self, x):
        out = self.conv(x)
        return out * x.mean(dim=0, keepdim=True).sigmoid()  # a batch statistic, as BatchNorm's

def mixes(spec):
    return MixesSamples(spec)

def frozen(spec):
    return nn.Conv2d(1, 2, 1).requires_grad_(False)

def not_a_module(spec):
    return "a string"

def fails(spec):
    raise RuntimeError("cannot build for this spec")

NOT_CALLABLE = 3
'''


@pytest.fixture()
def factories(tmp_path, monkeypatch) -> str:
    name = "securefed_test_user_factories"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    return name


def test_a_factory_model_is_made_dp_compatible_and_seeded(factories: str) -> None:
    spec = _seg((1, 16, 16))
    config = ModelConfig(factory=f"{factories}:good")
    model = build_model(config, spec, seed=3)
    assert isinstance(model[1], nn.GroupNorm) and model[2].inplace is False
    assert tuple(_output(model, spec).shape) == (2, 2, 16, 16)
    again = build_model(config, spec, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("function, fragments", [
    ("three_channels", ["three_channels", "(2, 1, 16, 16)", "(2, 3, 16, 16)", "needs (2, 2, 16, 16)",
                        "2 output channels"]),
    ("shrinks", ["(2, 2, 14, 14)", "needs (2, 2, 16, 16)", "spatial size"]),
    ("too_small_for", ["fails on inputs shaped (2, 1, 16, 16)", "RuntimeError"]),
    ("mixes", ["cannot be trained with DP-SGD", "mixes samples"]),
    ("frozen", ["no trainable parameters"]),
    ("not_a_module", ["returned a str", "torch.nn.Module"]),
    ("fails", ["raised RuntimeError: cannot build for this spec"]),
    ("NOT_CALLABLE", ["is a int, not a function"]),
    ("goood", ["has no attribute 'goood'", "did you mean 'good'"]),
])
def test_factory_errors_name_the_problem(factories: str, function: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(factory=f"{factories}:{function}"), _seg((1, 16, 16)), seed=0)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_factory_module_that_does_not_exist() -> None:
    with pytest.raises(ConfigError, match="module 'no_such_package_xyz.models' cannot be imported.*PYTHONPATH"):
        build_model(ModelConfig(factory="no_such_package_xyz.models:build"), _cls((30,)), seed=0)
