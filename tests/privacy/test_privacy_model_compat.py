"""make_dp_compatible on real MONAI networks, checked against Opacus and against plain autograd.

The independent check of per-sample correctness: after the fix, the per-sample gradient Opacus
computes for sample i in a batch must equal the gradient of sample i's loss computed alone by plain
autograd on an unhooked copy of the model. With BatchNorm left in, that cannot hold.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, SegResNet, UNet
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from securefed.errors import ConfigError
from securefed.privacy.losses import dice_ce_loss
from securefed.privacy.model_compat import (
    TrialOutcome,
    check_dp_compatible,
    make_dp_compatible,
    require_dp_compatible,
)

torch.set_num_threads(1)
# Opacus' hooks make torch say this on every backward pass; it is expected
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

BATCH = 2


def _densenet(dims: int) -> nn.Module:
    return DenseNet121(spatial_dims=dims, in_channels=1, out_channels=3)


def _unet_batchnorm(dims: int) -> nn.Module:
    # MONAI's segmentation tutorials build UNet with Norm.BATCH
    return UNet(spatial_dims=dims, in_channels=1, out_channels=3, channels=(4, 8, 16),
                strides=(2, 2), num_res_units=1, norm="batch")


def _segresnet(dims: int) -> nn.Module:
    return SegResNet(spatial_dims=dims, in_channels=1, out_channels=3, init_filters=4,
                     norm=("group", {"num_groups": 2}))


# (name, builder, dims, spatial size, segmentation?). DenseNet121 halves the resolution five
# times, so 3D needs 32^3 (16^3 would shrink to nothing).
CASES = [
    ("densenet121-2d", _densenet, 2, 32, False),
    pytest.param("densenet121-3d", _densenet, 3, 32, False, marks=pytest.mark.slow),
    ("unet-batchnorm-2d", _unet_batchnorm, 2, 32, True),
    ("unet-batchnorm-3d", _unet_batchnorm, 3, 16, True),
    ("segresnet-2d", _segresnet, 2, 32, True),
    ("segresnet-3d", _segresnet, 3, 16, True),
]


def _data(dims: int, size: int, segmentation: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((BATCH, 1) + (size,) * dims, generator=generator, dtype=torch.float64)
    shape = (BATCH, 1) + (size,) * dims if segmentation else (BATCH,)
    return x, torch.randint(0, 3, shape, generator=generator)


def _loss(output: torch.Tensor, y: torch.Tensor, segmentation: bool) -> torch.Tensor:
    return dice_ce_loss(output, y) if segmentation else F.cross_entropy(output, y)


def _raw_model_fails_under_opacus(model: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises((NotImplementedError, RuntimeError)) as caught:
        GradSampleModule(copy.deepcopy(model))(x).sum().backward()
    # BatchNorm: rejected for its buffers; in-place ReLU: autograd refuses the hooked view
    assert "buffers" in str(caught.value) or "inplace" in str(caught.value)


@pytest.mark.parametrize("name, build, dims, size, segmentation", CASES)
def test_fixed_monai_model_gives_exact_per_sample_gradients(name, build, dims, size, segmentation) -> None:
    torch.manual_seed(0)
    model = build(dims).double()  # float64, so "equal" can mean equal to ~1e-10
    x, y = _data(dims, size, segmentation)
    _raw_model_fails_under_opacus(model, x)
    assert not check_dp_compatible(model).ok

    fixed, report = make_dp_compatible(model)
    assert report.ok, report.summary()
    assert ModuleValidator.validate(fixed, strict=False) == []
    reference = copy.deepcopy(fixed)  # unhooked twin for the sample-alone gradients

    wrapped = GradSampleModule(fixed, loss_reduction="mean")
    _loss(wrapped(x), y, segmentation).backward()
    trainable = [(n, p) for n, p in fixed.named_parameters() if p.requires_grad]
    for param_name, param in trainable:
        assert param.grad_sample is not None, f"{name}: no per-sample gradient for {param_name}"
        assert param.grad_sample.shape == (BATCH, *param.shape)
    reference_params = [p for n, p in reference.named_parameters() if p.requires_grad]
    for i in range(BATCH):
        alone = _loss(reference(x[i:i + 1]), y[i:i + 1], segmentation)
        grads = torch.autograd.grad(alone, reference_params, allow_unused=True)
        for (param_name, param), grad in zip(trainable, grads):
            expected = torch.zeros_like(param) if grad is None else grad
            torch.testing.assert_close(param.grad_sample[i], expected, rtol=1e-7, atol=1e-10,
                                       msg=lambda m, p=param_name, s=i: f"{name} {p} sample {s}: {m}")

    # one DP-SGD step (clip, noise, update) goes through and changes the weights
    before = [p.detach().clone() for _, p in trainable]
    optimizer = DPOptimizer(torch.optim.SGD(fixed.parameters(), lr=0.1), noise_multiplier=1.0,
                            max_grad_norm=1.0, expected_batch_size=BATCH)
    optimizer.step()
    assert all(torch.isfinite(p).all() for _, p in trainable)
    assert any(not torch.equal(b, p) for b, (_, p) in zip(before, trainable))


def test_default_unet_needs_no_change() -> None:
    # MONAI's default UNet (InstanceNorm without running stats, PReLU) already works with Opacus
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2))
    x, _ = _data(2, 32, True)
    fixed, report = make_dp_compatible(model, example_input=x.float())
    assert (report.replaced_norms, report.disabled_inplace, report.remaining_problems) == ((), (), ())
    assert report.trial is TrialOutcome.PASSED and report.ok


def test_segresnet_residual_blocks_become_out_of_place_without_changing_the_function() -> None:
    model = _segresnet(3)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ResBlock"]
    assert len(blocks) == 12  # blocks_down (1, 2, 2, 4) and blocks_up (1, 1, 1)
    problems = check_dp_compatible(model).remaining_problems
    assert sum("adds its residual in place" in p for p in problems) == len(blocks)
    fixed, report = make_dp_compatible(model, example_input=torch.randn(2, 1, 16, 16, 16))
    assert list(report.out_of_place_blocks) == blocks and report.replaced_norms == ()
    assert report.trial is TrialOutcome.PASSED, report.summary()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():  # GroupNorm throughout, so the fixed model computes the same function
        torch.testing.assert_close(fixed.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert "forward" not in vars(model.get_submodule(blocks[0]))  # the caller's blocks untouched
    assert check_dp_compatible(copy.deepcopy(fixed.train())).ok  # the fix survives a deep copy...
    saved = io.BytesIO()
    torch.save(fixed, saved)  # ...and whole-model pickling
    saved.seek(0)
    assert check_dp_compatible(torch.load(saved, weights_only=False)).ok


def test_densenet_report_names_every_changed_layer_and_leaves_caller_model_alone() -> None:
    model = _densenet(2)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    structure = str(model)
    batch_norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    inplace = [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    assert len(batch_norms) == 121 and len(inplace) == 121

    problems = check_dp_compatible(model).remaining_problems
    assert len(problems) == 242
    assert any("'features.norm0' (BatchNorm2d)" in p and "GroupNorm" in p for p in problems)
    assert any("'features.relu0' (ReLU)" in p and "inplace=False" in p for p in problems)

    fixed, report = make_dp_compatible(model)
    assert list(report.replaced_norms) == batch_norms
    assert list(report.disabled_inplace) == inplace
    assert not any(getattr(m, "inplace", False) for m in fixed.modules())
    assert "features.denseblock1.denselayer1.layers.norm1" in report.replaced_norms
    for layer_name, groups in zip(report.replaced_norms, report.group_counts):
        old, new = model.get_submodule(layer_name), fixed.get_submodule(layer_name)
        assert isinstance(new, nn.GroupNorm) and new.num_groups == groups
        assert old.num_features % groups == 0 and old.num_features // groups >= 2
        torch.testing.assert_close(new.weight, old.weight)
    assert "replaced 121 BatchNorm" in report.summary()

    # the caller's model is untouched
    assert str(model) == structure
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert all(m.inplace for n, m in model.named_modules() if n in inplace)


def test_group_counts_frozen_layers_and_running_stats() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 64, 1), nn.BatchNorm2d(64),  # 32 groups (Wu & He's default)
        nn.Conv2d(64, 48, 1), nn.BatchNorm2d(48),  # 24: gcd(32, 48) would give 16
        nn.Conv2d(48, 9, 1), nn.BatchNorm2d(9),  # 3: gcd(32, 9) would give 1 (LayerNorm)
        nn.Conv2d(9, 4, 1), nn.SyncBatchNorm(4), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.Conv2d(4, 1, 1), nn.BatchNorm2d(1),
    )
    model[3].requires_grad_(False)  # frozen, yet it would still mix samples in train mode
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
    fixed, report = make_dp_compatible(model, example_input=torch.randn(3, 1, 6, 6))
    assert report.replaced_norms == ("1", "3", "5", "7", "10")
    assert report.group_counts == (32, 24, 3, 2, 1)
    assert report.disabled_running_stats == ("8",)
    assert list(fixed[8].buffers()) == [] and not fixed[8].track_running_stats
    assert not fixed[3].weight.requires_grad and fixed[1].weight.requires_grad
    torch.testing.assert_close(fixed[1].weight, model[1].weight)
    assert report.trial is TrialOutcome.PASSED, report.summary()
    explicit = make_dp_compatible(model, groups=8)[1]
    assert explicit.group_counts == (8, 8, 3, 4, 1)


def test_unfixable_layer_is_named_with_its_fix() -> None:
    # spectral normalisation keeps power-iteration vectors in buffers: Opacus cannot handle it
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.utils.spectral_norm(nn.Conv2d(8, 2, 3)))
    with pytest.raises(ConfigError) as caught:
        require_dp_compatible(model)
    assert len(caught.value.problems) == 3  # every problem at once
    fixed, report = make_dp_compatible(model, example_input=torch.randn(2, 1, 8, 8))
    assert not report.ok and report.trial is TrialOutcome.SKIPPED
    with pytest.raises(ConfigError) as caught:
        require_dp_compatible(fixed)
    (problem,) = caught.value.problems
    assert "'3' (Conv2d)" in problem and "weight_u" in problem and "requires_grad_(False)" in problem
    with pytest.raises(NotImplementedError):  # the complaint is real
        GradSampleModule(fixed)
    fixed[3].requires_grad_(False)  # frozen layers are fine
    require_dp_compatible(fixed, example_input=torch.randn(2, 1, 8, 8))


def test_opacus_validator_complaints_are_mapped_to_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)).eval()
    problems = check_dp_compatible(model).remaining_problems
    assert len(problems) == 2
    assert "eval mode" in problems[0] and "model.train()" in problems[0]
    assert "'1' (LSTM)" in problems[1] and "DPLSTM" in problems[1]


class _AddsInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.conv(x))
        hidden += 1.0  # in-place on a hooked layer's output: invisible to any static check
        return self.head(hidden.mean(dim=(2, 3)))


class _CentresBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(x).mean(dim=(2, 3))
        return self.head(hidden - hidden.mean(dim=0))  # mixes samples, like batch statistics


class _TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = nn.Linear(4, 3), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.encoder(x), self.decoder.weight)  # decoder used outside its forward


@pytest.mark.parametrize("model, x, expected", [
    (_AddsInPlace(), torch.randn(3, 1, 6, 6), ["'<model>' (_AddsInPlace) failed in forward", "out-of-place"]),
    (_CentresBatch(), torch.randn(3, 1, 6, 6), ["computed alone", "'head' (Linear)", "mixes samples"]),
    (_TiedWeights(), torch.randn(3, 4), ["no per-sample gradient", "'decoder' (Linear)"]),
])
def test_trial_step_finds_runtime_problems(model: nn.Module, x: torch.Tensor, expected: list[str]) -> None:
    assert check_dp_compatible(model).ok  # nothing to see statically
    fixed, report = make_dp_compatible(model, example_input=x)
    assert report.trial is TrialOutcome.FAILED and not report.ok
    (problem,) = report.remaining_problems
    assert all(text in problem for text in expected), problem
    with pytest.raises(ConfigError):
        require_dp_compatible(model, example_input=x)


def test_bad_arguments_are_all_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        make_dp_compatible("not a model", groups=0, example_input=torch.randn(1, 3))
    assert len(caught.value.problems) == 3
    with pytest.raises(ConfigError, match="groups must be a positive int"):
        make_dp_compatible(nn.Linear(2, 2), groups=True)
