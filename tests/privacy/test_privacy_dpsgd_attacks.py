"""Attacks on a site's DP-SGD training, each stopped by make_private / train_round.

Every test builds the attack a careless (or curious) caller could mount and checks the defence
against an independent reference: the released update is compared with per-sample gradients
computed here by plain autograd on one record at a time, clipped and summed (or with the DP
bound |batch| C / B it must respect), and privacy numbers with dp-accounting.
"""

from __future__ import annotations

import copy
import math
import warnings

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from securefed.errors import ConfigError, PrivacyBudgetExceeded, PrivacyError
from securefed.primitives.identity import SiteIdentity
from securefed.privacy import dpsgd_checks
from securefed.privacy.dpsgd import make_private
from securefed.privacy.dpsgd_config import ClippingMode, DPSGDConfig
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger
from securefed.privacy.losses import dice_ce_loss, per_sample_cross_entropy

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss(reduction="none")
MODES = ["per-sample", "ghost", "fast"]


class Records(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.reads = x, y, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        self.reads.append(int(index))
        return self.x[index], self.y[index]


def _records(n: int = 40, features: int = 6, scale: float = 3.0, seed: int = 0) -> Records:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g) * scale
    return Records(x, (x[:, 0] > 0).long())


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))


def _config(**overrides) -> DPSGDConfig:
    fields = dict(max_grad_norm=0.1, delta=1e-3, batch_size=8, noise_multiplier=1e-6, steps_per_round=1,
                  device="cpu")
    fields.update(overrides)
    return DPSGDConfig(**fields)


def _sgd(params):
    return torch.optim.SGD(params, lr=1.0)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same MLP without the hooks a training attached (a deep copy would keep them)."""
    plain = _mlp()
    plain.load_state_dict(model.state_dict())
    return plain


def _update_norm(before: list[torch.Tensor], model: nn.Module) -> float:
    return math.sqrt(sum(float(((b - p.detach()) ** 2).sum()) for b, p in zip(before, model.parameters())))


def _clipped_mean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, batch: int):
    """Plain autograd, one record at a time, clipped over all parameters, summed, / batch."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(CE(model(x[i:i + 1]), y[i:i + 1]).sum(), params)
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        for t, g in zip(total, grads):
            t += g * min(1.0, clip / norm)
    return [t / batch for t in total]


def _assert_is_the_clipped_mean(before, model, reference_model, data: Records) -> None:
    batch = sorted(data.reads)
    expected = _clipped_mean(reference_model, data.x[batch], data.y[batch], 0.1, 8)
    for b, p, e in zip(before, model.parameters(), expected):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-3, atol=1e-6)


def _non_private_backward(model: nn.Module, data: Records) -> None:
    """What a site might run outside DP-SGD: a backward over ALL records (e.g. saliency maps)."""
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CE(model(data.x), data.y).sum().mul(1000).backward()


# --------------------------------------------------------------------------- stale state (1, 5, 10)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("when", ["before make_private", "between rounds"])
def test_a_non_private_backward_never_enters_a_released_step(mode: str, when: str) -> None:
    data, model = _records(), _mlp()
    if when == "before make_private":
        _non_private_backward(model, data)
    training = make_private(model, _sgd, data, config=_config(clipping=mode), seed=1)
    if when == "between rounds":
        training.train_round(CE, round_id=0)
        _non_private_backward(model, data)  # leaves p.grad (and Opacus' grad_sample) on every parameter
    reference, before = _plain_copy(model), _params(model)
    data.reads.clear()
    training.train_round(CE, round_id=1)
    # The leak was a released update of norm ~4000 (FAST) or one that included the outside records.
    assert _update_norm(before, model) <= len(data.reads) * 0.1 / 8 * 1.001 + 1e-5
    _assert_is_the_clipped_mean(before, model, reference, data)


@pytest.mark.parametrize("mode", MODES)
def test_a_forward_with_gradients_between_rounds_changes_nothing(mode: str) -> None:
    data, model = _records(), _mlp()
    training = make_private(model, _sgd, data, config=_config(clipping=mode), seed=1)
    training.train_round(CE, round_id=0)
    model.train()
    CE(model(data.x), data.y).mean().item()  # logging the training loss, no torch.no_grad()
    reference, before = _plain_copy(model), _params(model)
    data.reads.clear()
    training.train_round(CE, round_id=1)  # used to fail after its charge (per-sample, ghost)
    _assert_is_the_clipped_mean(before, model, reference, data)


@pytest.mark.parametrize("mode", MODES)
def test_no_gradient_is_left_on_the_model_after_a_round(mode: str) -> None:
    model = _mlp()
    training = make_private(model, _sgd, _records(), config=_config(clipping=mode, steps_per_round=2))
    training.train_round(CE, round_id=0)
    for p in model.parameters():
        assert p.grad is None
        assert getattr(p, "grad_sample", None) is None and getattr(p, "summed_grad", None) is None


def test_trainable_parameters_outside_the_optimizer_are_refused() -> None:
    model = _mlp()
    with pytest.raises(ConfigError, match=r"'0\.weight', '0\.bias'.*requires_grad_\(False\)"):
        make_private(model, torch.optim.SGD(model[2].parameters(), lr=0.1), _records(), config=_config())
    with pytest.raises(ConfigError, match="does not hold"):
        make_private(model, lambda ps: torch.optim.SGD(ps[2:], lr=0.1), _records(), config=_config())
    model[0].requires_grad_(False)  # the fix the message names
    training = make_private(model, torch.optim.SGD(model[2].parameters(), lr=0.1), _records(), config=_config())
    assert training.train_round(CE, round_id=0).steps == 1


# --------------------------------------------------------------------------- sensitivity (2, 3, 4, 12)
class TiedSum(nn.Module):
    """One weight used by two layers (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a(x) + self.b(x)).sum(1, keepdim=True)


class ParentUsesChildWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + 3 * F.linear(x, self.layer.weight)


class Slices(nn.Module):
    """2.5D: the K slices of a record are folded into the batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, d = x.shape
        return self.layer(x.reshape(b * k, d)).reshape(b, k).sum(1, keepdim=True)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


def _one_record_round(model: nn.Module, mode: str, x: torch.Tensor, **make):
    """q = 1 on a single record, almost no noise: the update IS the record's clipped gradient."""
    config = _config(max_grad_norm=1.0, batch_size=1, delta=0.5, clipping=mode)
    training = make_private(model, _sgd, Records(x, torch.zeros(len(x))), config=config, seed=1, **make)
    before = _params(model)
    training.train_round(lambda out, y: (out.float() ** 2).reshape(len(out), -1).sum(1) * 10, round_id=0)
    return training, _update_norm(before, model)


def test_tied_weights_make_auto_fall_back_and_fast_refuse() -> None:
    x = torch.full((1, 6), 5.0)
    training, norm = _one_record_round(TiedSum(), "auto", x)
    assert training.clipping is ClippingMode.PER_SAMPLE
    assert norm <= 1.0 + 1e-4  # FAST clipped each use alone: sqrt(2) C
    with pytest.raises(ConfigError, match="share a trainable parameter"):
        _one_record_round(TiedSum(), "fast", x)


@pytest.mark.parametrize("mode", ["per-sample", "ghost"])
def test_folding_extra_dimensions_into_the_batch_is_refused(mode: str) -> None:
    x = torch.full((1, 4, 6), 3.0)  # one record, four slices: each slice was clipped to C (4 C released)
    model = Slices()
    before = _params(model)
    with pytest.raises(ConfigError, match="folds extra dimensions") as caught:
        _one_record_round(model, mode, x)
    assert "'layer.weight' (4 rows)" in str(caught.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored
    # With an example input the model is refused before anything is charged.
    with pytest.raises(ConfigError, match="do not add up"):
        _one_record_round(Slices(), mode, x, example_input=torch.randn(3, 4, 6))


def test_ghost_refuses_a_parameter_used_outside_its_layer(monkeypatch) -> None:
    x = torch.full((1, 6), 5.0)
    model = ParentUsesChildWeight()  # ghost saw one use of the weight and released all four: 4 C
    before = _params(model)
    with pytest.raises(ConfigError, match="'layer.weight' are used outside their own layer"):
        _one_record_round(model, "ghost", x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for mode in ("auto", "per-sample"):  # these leave the unseen use out of the sum instead
        _, norm = _one_record_round(ParentUsesChildWeight(), mode, x)
        assert norm <= 1.0 + 1e-4
    with pytest.raises(ConfigError, match="do not add up"):  # refused before any charge
        _one_record_round(ParentUsesChildWeight(), "ghost", x, example_input=torch.randn(2, 6))
    # The triangle bound backs the use count up: without it, the step is still refused.
    monkeypatch.setattr(dpsgd_checks, "_refuse_unseen_uses", lambda *args: None)
    model = ParentUsesChildWeight()
    before = _params(model)
    with pytest.raises(PrivacyError, match="'layer.weight' in round '0' has norm 4, more than the 1 "):
        _one_record_round(model, "ghost", x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_triangle_bound_holds_for_correct_sums_and_refuses_longer_ones() -> None:
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(5, 7, generator=g)  # five records' gradients of one parameter
    norms = grads.norm(dim=1)
    coefficients = (1.0 / norms).clamp(max=1.0)
    param = nn.Parameter(torch.zeros(7))
    param.grad = (coefficients[:, None] * grads).sum(0)
    dpsgd_checks.check_release_bound([("w", param)], norms, coefficients, max_grad_norm=1.0, key="r")
    aligned = grads[0].expand(5, 7)  # the tight case: all records point the same way
    param.grad = (coefficients[0] * aligned).sum(0)
    dpsgd_checks.check_release_bound([("w", param)], aligned.norm(dim=1), coefficients[:1].expand(5),
                                     max_grad_norm=1.0, key="r")
    param.grad = param.grad * 1.5  # a third of each record's contribution was not in the norms
    with pytest.raises(PrivacyError, match="'the model' in round 'r'"):
        dpsgd_checks.check_release_bound([("w", param)], aligned.norm(dim=1), coefficients[:1].expand(5),
                                         max_grad_norm=1.0, key="r")
    with pytest.raises(PrivacyError, match="'w' in round 'r'"):  # per parameter: (P, B) norms
        dpsgd_checks.check_release_bound([("w", param)], aligned.norm(dim=1)[None], coefficients[:1].expand(5),
                                         max_grad_norm=1.0, key="r")


def test_ghost_with_a_layer_called_twice_fails_typed_and_restored() -> None:
    model = Twice()
    before = _params(model)
    training = make_private(model, _sgd, _records(), config=_config(clipping="ghost"), seed=1)
    with pytest.raises(ConfigError, match="runs more than once"):
        training.train_round(CE, round_id=0)
    assert training.rounds == ("0",)  # charged: data was read
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ConfigError, match="'layer' runs 2 times"):  # refused before any charge
        make_private(Twice(), _sgd, _records(), config=_config(clipping="ghost"), example_input=torch.randn(2, 6))
    for mode in ("auto", "per-sample"):  # no false alarm where the mode supports the model
        make_private(Twice(), _sgd, _records(), config=_config(clipping=mode), example_input=torch.randn(2, 6))


def test_reparametrised_weights_are_refused_before_any_charge() -> None:
    lin = torch.nn.utils.parametrizations.weight_norm(nn.Linear(6, 6))
    for mode in ("auto", "per-sample", "ghost", "fast"):  # FAST noised zeros, per-sample crashed mid-round
        with pytest.raises(ConfigError, match="computed 'weight'"):
            make_private(nn.Sequential(lin, nn.Linear(6, 2)), _sgd, _records(), config=_config(clipping=mode))


# --------------------------------------------------------------------------- coupled losses (6)
def _centred(out, y):  # per-sample shape, but each entry depends on the whole batch
    s = out[:, 0]
    return (s - s.mean()) ** 2


def _pooled_dice(out, y):  # MONAI DiceLoss(batch=True): one Dice over all the batch's voxels
    from monai.losses import DiceLoss

    return DiceLoss(softmax=True, to_onehot_y=True, batch=True)(out, y)


def _segmentation(n: int = 12) -> Records:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return Records(x, (x > 0.5).long())


def _segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize(("mode", "loss"), [("per-sample", _centred), ("ghost", _centred), ("fast", _centred),
                                            ("per-sample", lambda o, y: _centred(o, y).mean())])
def test_a_loss_that_couples_records_is_refused(mode: str, loss) -> None:
    # Replacing one record by an outlier moved the released update ~400 times the DP bound (ghost).
    model = _mlp()
    before = _params(model)
    training = make_private(model, _sgd, _records(), config=_config(clipping=mode), seed=1)
    with pytest.raises(ConfigError, match="couples the records"):
        training.train_round(loss, round_id=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_batch_pooled_dice_is_refused_and_per_sample_segmentation_losses_pass() -> None:
    config = _config(clipping="per-sample", batch_size=6, steps_per_round=2)
    training = make_private(_segmenter(), _sgd, _segmentation(), config=config, seed=2)
    with pytest.raises(ConfigError, match="couples the records"):
        training.train_round(_pooled_dice, round_id=0)
    for i, loss in enumerate([per_sample_cross_entropy, lambda o, y: dice_ce_loss(o, y, reduction="none"),
                              lambda o, y: per_sample_cross_entropy(o, y).mean(),
                              lambda o, y: per_sample_cross_entropy(o, y).sum()]):
        assert training.train_round(loss, round_id=f"ok{i}").steps == 2


# --------------------------------------------------------------------------- ledger and seeds (7, 11)
def _reference_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return accountant.get_epsilon(delta)


def _ledger(tmp_path, name: str = "l.db", epsilon: float = 50.0) -> PrivacyLedger:
    return PrivacyLedger.create(tmp_path / name, identity=SiteIdentity.generate("site"),
                                budget=PrivacyBudget(epsilon=epsilon, delta=1e-3))


def test_target_epsilon_holds_across_a_restart_that_forgets_its_state(tmp_path) -> None:
    ledger = _ledger(tmp_path)
    config = _config(max_grad_norm=1.0, batch_size=10, noise_multiplier=None, target_epsilon=2.0,
                     planned_rounds=2, steps_per_round=4)
    data = _records(n=100)
    first = make_private(_mlp(), _sgd, data, config=config, ledger=ledger)
    first.train_round(CE, round_id="r1")
    first.train_round(CE, round_id="r2")
    # A third round would spend more than the target (dp-accounting, independently).
    assert _reference_epsilon(first.noise_multiplier, 0.1, 12, 1e-3) > 2.0
    restarted = make_private(_mlp(), _sgd, data, config=config, ledger=ledger)  # no load_state_dict
    data.reads.clear()
    with pytest.raises(PrivacyBudgetExceeded, match="target_epsilon"):
        restarted.train_round(CE, round_id="r3")
    assert data.reads == []
    with pytest.raises(ConfigError, match="already holds a DP-SGD charge for round 'r1'"):
        restarted.train_round(CE, round_id="r1")
    assert len(ledger.entries()) == 3  # genesis and the two rounds: nothing else was charged


def test_a_seeded_round_id_rerun_on_another_ledger_position_draws_new_noise(tmp_path) -> None:
    def noise(ledger: PrivacyLedger, earlier: list[str]) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(6, 4)
        training = make_private(model, _sgd, _records(), config=_config(noise_multiplier=1.0), ledger=ledger, seed=7)
        for key in earlier:  # charged before, e.g. the round that crashed
            ledger.charge(training.plan.round_event(), round_id=key, note="dp-sgd")
        before = _params(model)
        training.train_round(lambda out, y: (out * 0.0).sum(1), round_id="r")  # the update is the noise
        return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])

    first = noise(_ledger(tmp_path, "a.db"), [])
    assert torch.equal(first, noise(_ledger(tmp_path, "b.db"), []))  # still reproducible for simulation
    assert not torch.allclose(first, noise(_ledger(tmp_path, "c.db"), ["crashed"]))
