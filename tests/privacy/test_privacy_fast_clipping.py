"""The book-keeping clipping engine against an independent computation: one sample at a time.

The reference runs plain autograd on each sample alone (no hooks, no engine: the model is a deep
copy), clips that gradient to ``C`` over all parameters together and sums. ``C`` is the median of
the reference norms, so some samples are clipped and some are not. Every way of computing a layer
(ghost norm, per-sample gradients recomputed or kept, and the automatic mix) must give the same
norms and the same clipped sum.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet, UNet
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from securefed.errors import ConfigError, PrivacyError
from securefed.privacy import fast_clipping_layers
from securefed.privacy.fast_clipping import BookKeepingClipper, LayerPlan, add_noise_
from securefed.privacy.model_compat import make_dp_compatible

torch.set_num_threads(1)

PLANS = [None, LayerPlan.GHOST, LayerPlan.INSTANTIATE, LayerPlan.INSTANTIATE_AND_KEEP]
RTOL = 1e-4


class _ConvNet(nn.Module):
    """Conv2d with stride, padding, dilation and groups, GroupNorm, PReLU, a transposed conv with
    output padding and groups, affine InstanceNorm, reflect 'same' padding, one conv used twice,
    LayerNorm and Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.act = nn.PReLU(8)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.same = nn.Conv2d(6, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.shared = nn.Conv2d(4, 4, 1)
        self.head_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.dilated(self.norm(self.down(x))))
        h = self.same(torch.tanh(self.inorm(self.up(h))))
        # the same layer on two resolutions: its per-sample gradient is the sum of both calls
        a = self.shared(h).mean((2, 3))
        b = self.shared(F.avg_pool2d(h, 2)).amax((2, 3))
        return self.head(self.head_norm(torch.cat([a, b], 1)))


class _VolumeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.up = nn.ConvTranspose3d(4, 4, 2, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(F.relu(self.norm(self.conv(x))))
        return self.head(h.mean((2, 3, 4)))


class _SequenceNet(nn.Module):
    """Embedding with a padding index, Conv1d, and a Linear and a LayerNorm applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.mix = nn.Linear(5, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        h = self.norm(self.mix(torch.tanh(self.norm(self.mix(h)))))
        return self.head(h).mean(1)


def _dp(model: nn.Module) -> nn.Module:
    fixed, report = make_dp_compatible(model)
    assert report.ok, report.summary()
    return fixed


def _classes(gen, batch, shape=()):
    return torch.randint(0, 3, (batch, *shape), generator=gen)


def _case(name: str):
    """(model, inputs, targets, per-sample loss function) for one test model."""
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(5)
    mean_ce = lambda out, y: F.cross_entropy(out, y, reduction="none").reshape(len(out), -1).mean(1)  # noqa: E731
    if name == "mlp":
        model = nn.Sequential(nn.Linear(7, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
        return model, torch.randn(6, 7, generator=gen), _classes(gen, 6), mean_ce
    if name == "convnet":
        return _ConvNet(), torch.randn(5, 3, 12, 12, generator=gen), _classes(gen, 5), mean_ce
    if name == "conv3d":
        return _VolumeNet(), torch.randn(4, 2, 6, 6, 6, generator=gen), _classes(gen, 4), mean_ce
    if name == "sequence":
        tokens = torch.randint(0, 12, (5, 9), generator=gen)
        tokens[:, -2:] = 0  # padding
        return _SequenceNet(), tokens, _classes(gen, 5), mean_ce
    if name == "monai-unet":
        model = _dp(UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                         num_res_units=1))
        return model, torch.randn(4, 1, 16, 16, generator=gen), _classes(gen, 4, (16, 16)), mean_ce
    if name == "monai-densenet":
        model = _dp(DenseNet(spatial_dims=2, in_channels=1, out_channels=3, init_features=8, growth_rate=4,
                             block_config=(2, 2), bn_size=2))
        return model, torch.randn(4, 1, 24, 24, generator=gen), _classes(gen, 4), mean_ce
    raise AssertionError(name)


MODELS = ["mlp", "convnet", "conv3d", "sequence", "monai-unet", "monai-densenet"]


def _reference(model: nn.Module, inputs, targets, loss_fn, max_grad_norm: float):
    """Each sample's gradient by plain autograd on an unhooked copy; (norms, clipped sums)."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(len(inputs)):
        loss = loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / float(norm))
        for s, g in zip(sums, grads):
            s += factor * g.double()
    return torch.stack(norms), sums


def _assert_matches(model, norms, reference_norms, reference_sums) -> None:
    torch.testing.assert_close(norms.double(), reference_norms, rtol=RTOL, atol=0)
    total = torch.sqrt(sum((s ** 2).sum() for s in reference_sums))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (name, p), ref in zip(params, reference_sums):
        assert p.grad is not None, name
        error = (p.grad.double() - ref).norm()
        # relative per parameter; a parameter whose true gradient is ~0 (a bias right before a
        # normalisation) is held to rounding of the whole gradient instead
        assert error <= RTOL * ref.norm() + 1e-6 * total, f"{name}: error {error:.3g}, norm {ref.norm():.3g}"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "auto" if p is None else p.value)
@pytest.mark.parametrize("name", MODELS)
def test_matches_each_sample_computed_alone(name, plan):
    model, inputs, targets, loss_fn = _case(name)
    ref_norms, _ = _reference(model, inputs, targets, loss_fn, float("inf"))
    max_grad_norm = float(ref_norms.median())  # about half the samples get clipped
    ref_norms, ref_sums = _reference(model, inputs, targets, loss_fn, max_grad_norm)
    assert (ref_norms > max_grad_norm).any() and (ref_norms < max_grad_norm).any()

    clipper = BookKeepingClipper(model, max_grad_norm=max_grad_norm, plan=plan)
    norms = clipper.backward(loss_fn(model(inputs), targets))
    _assert_matches(model, norms, ref_norms, ref_sums)
    if plan is not None:  # the forced plan really ran wherever a layer has a choice
        ghost_capable = {n for n, m in model.named_modules()
                         if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d,
                                           nn.ConvTranspose3d))}
        assert ghost_capable <= set(clipper.last_plans)
        assert {clipper.last_plans[n] for n in ghost_capable} == {plan}


def test_ghost_gathers_offsets_one_at_a_time_when_large(monkeypatch):
    monkeypatch.setattr(fast_clipping_layers, "_GATHER_AT_ONCE", 0)
    test_matches_each_sample_computed_alone("convnet", LayerPlan.GHOST)


def test_automatic_choice_mixes_ghost_and_instantiation():
    """Wide early layers (many positions) instantiate, narrow deep ones (few positions) go ghost."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 64, 4, stride=4), nn.ReLU(),
                          nn.Conv2d(64, 128, 3, padding=1), nn.Flatten(), nn.Linear(128 * 4, 2))
    inputs, targets = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 1])
    loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    ref_norms, ref_sums = _reference(model, inputs, targets, loss_fn, 0.5)
    clipper = BookKeepingClipper(model, max_grad_norm=0.5)
    norms = clipper.backward(loss_fn(model(inputs), targets))
    _assert_matches(model, norms, ref_norms, ref_sums)
    assert clipper.last_plans["0"] is LayerPlan.INSTANTIATE_AND_KEEP
    assert clipper.last_plans["4"] is LayerPlan.GHOST


def test_frozen_parameters_and_existing_gradients():
    model, inputs, targets, loss_fn = _case("convnet")
    model.down.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    ref_norms, ref_sums = _reference(model, inputs, targets, loss_fn, 0.05)
    existing = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        p.grad = existing[n].clone() if n in existing else None
    norms = BookKeepingClipper(model, max_grad_norm=0.05).backward(loss_fn(model(inputs), targets))
    for n, p in model.named_parameters():
        if n in existing:
            p.grad -= existing[n]  # backward must add to .grad, not overwrite it
        else:
            assert p.grad is None, n
    _assert_matches(model, norms, ref_norms, ref_sums)


def test_forwards_without_backward_are_ignored():
    model, inputs, targets, loss_fn = _case("mlp")
    ref_norms, ref_sums = _reference(model, inputs, targets, loss_fn, 0.3)
    clipper = BookKeepingClipper(model, max_grad_norm=0.3)
    with torch.no_grad():
        model(inputs[:2])  # evaluation: nothing recorded
    model(torch.randn(3, 7))  # a forward whose graph the loss never uses
    norms = clipper.backward(loss_fn(model(inputs), targets))
    _assert_matches(model, norms, ref_norms, ref_sums)


def test_noise_through_opacus_fast_gradient_clipping_optimizer():
    """DPOptimizerFastGradientClipping takes the clipped sum from p.grad: with zero noise the step
    is lr * clipped sum / expected batch size."""
    model, inputs, targets, loss_fn = _case("mlp")
    _, ref_sums = _reference(model, inputs, targets, loss_fn, 0.3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0,
                                                max_grad_norm=0.3, expected_batch_size=10)
    clipper = BookKeepingClipper(model, max_grad_norm=0.3)
    optimizer.zero_grad()
    clipper.backward(loss_fn(model(inputs), targets))
    optimizer.step()
    for b, p, s in zip(before, model.parameters(), ref_sums):
        torch.testing.assert_close((b - p.detach()).double(), 0.5 * s / 10, rtol=1e-4, atol=1e-7)


def test_add_noise_has_the_dp_sgd_scale():
    params = [nn.Parameter(torch.zeros(200, 100)), nn.Parameter(torch.zeros(50))]
    params[0].grad = torch.full((200, 100), 3.0)
    add_noise_(params, noise_multiplier=2.0, max_grad_norm=1.5, expected_batch_size=4,
               generator=torch.Generator().manual_seed(3))
    noise = torch.cat([(params[0].grad - 3.0 / 4).flatten(), params[1].grad.flatten()])
    # (3 + N(0, (2 * 1.5)^2)) / 4: mean 3/4, standard deviation 0.75; 20050 draws
    assert abs(float(noise.mean())) < 4 * 0.75 / 20050 ** 0.5
    assert abs(float(noise.std()) / 0.75 - 1) < 0.03


def test_add_noise_reports_every_bad_argument():
    with pytest.raises(ConfigError) as info:
        add_noise_([], noise_multiplier=-1.0, max_grad_norm=0.0, expected_batch_size=float("nan"))
    assert len(info.value.problems) == 3


class _OwnForwardConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale


def test_unsupported_layers_are_all_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), _RawParameter(), _OwnForwardConv(4, 4, 1),
                          nn.Flatten(), nn.LSTM(4, 4))
    with pytest.raises(ConfigError) as info:
        BookKeepingClipper(model, max_grad_norm=1.0)
    problems = info.value.problems
    assert len(problems) == 4
    for index, kind in (("1", "BatchNorm2d"), ("2", "_RawParameter"), ("3", "_OwnForwardConv"), ("5", "LSTM")):
        assert any(f"'{index}'" in p and kind in p for p in problems), (index, problems)


def test_bad_arguments():
    with pytest.raises(ConfigError) as info:
        BookKeepingClipper(nn.Linear(2, 2), max_grad_norm=-1.0, plan="fastest")
    assert len(info.value.problems) == 2
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        BookKeepingClipper(frozen, max_grad_norm=1.0)


def test_bad_losses_are_rejected():
    model = nn.Linear(3, 2)
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="1-d tensor"):
        clipper.backward(model(torch.randn(4, 3)).sum())
    with pytest.raises(ConfigError, match="batch"):
        clipper.backward(model(torch.randn(4, 3)).sum(1)[:3])
    with pytest.raises(PrivacyError, match="not finite"):
        clipper.backward(model(torch.tensor([[1.0, 2.0, float("nan")]])).sum(1))
    assert model.weight.grad is None


def test_in_place_activation_after_a_layer_is_fine():
    """The engine takes gradients at the layer's autograd edge, so an in-place ReLU that rewrites
    the layer's output afterwards does not change what it sees."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(8, 2), nn.ReLU(inplace=True))
    inputs, targets = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 1, 0])
    loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    ref_norms, ref_sums = _reference(model, inputs, targets, loss_fn, 0.2)
    norms = BookKeepingClipper(model, max_grad_norm=0.2).backward(loss_fn(model(inputs), targets))
    _assert_matches(model, norms, ref_norms, ref_sums)


class _EditsInputAfterUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        hidden = self.first(x)
        out = self.second(hidden)
        hidden.mul_(2)  # rewrites what self.second read
        return out + hidden[:, :2]


def test_layer_input_edited_in_place_is_detected():
    model = _EditsInputAfterUse()
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="'second'.*modified in place"):
        clipper.backward(model(torch.randn(2, 3)).sum(1))


def test_empty_batch_and_unused_layer_give_zero_gradients():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    assert clipper.backward(model["used"](torch.randn(0, 3)).sum(1)).shape == (0,)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    norms = clipper.backward(model["used"](torch.randn(2, 3)).sum(1))
    assert norms.shape == (2,) and model["used"].bias.grad.any() and not model["unused"].weight.grad.any()


def test_removed_hooks_record_nothing():
    model = nn.Linear(3, 2)
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    clipper.remove()
    model(torch.randn(2, 3)).sum().backward()  # an ordinary backward still works
    assert clipper.backward(model(torch.randn(2, 3)).sum(1)).shape == (2,)
    assert clipper.last_plans == {}


class _Tied(nn.Module):
    """Weight tying: ``b`` uses ``a``'s weight, so a sample's gradient for it is the sum of both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False), nn.Linear(5, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class _SameLayerTwice(nn.Module):
    """One layer registered under two names: one layer, not two sharing a weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(5, 5), nn.Linear(5, 3)
        self.b = self.a

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_shared_and_reparametrised_weights_are_refused():
    # Tying clipped each use on its own: the sum of two uses reached sqrt(2) C per sample.
    with pytest.raises(ConfigError, match="'a', 'b' share a trainable parameter"):
        BookKeepingClipper(_Tied(), max_grad_norm=1.0)
    # weight_norm's computed weight got the clipped sum while weight_g and weight_v got nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = torch.nn.utils.weight_norm(nn.Linear(5, 5))
    for layer in (old, torch.nn.utils.parametrizations.weight_norm(nn.Linear(5, 5))):
        with pytest.raises(ConfigError, match="computed 'weight'"):
            BookKeepingClipper(nn.Sequential(layer, nn.Linear(5, 2)), max_grad_norm=1.0)
    model = _SameLayerTwice()
    inputs, targets = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1])
    loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    ref_norms, ref_sums = _reference(model, inputs, targets, loss_fn, 0.2)
    norms = BookKeepingClipper(model, max_grad_norm=0.2).backward(loss_fn(model(inputs), targets))
    _assert_matches(model, norms, ref_norms, ref_sums)
