"""LocalTrainer and evaluate_model: DP-SGD rounds charge the ledger once, updates, plain SGD, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from securefed.data import ArrayDataset, TaskKind, TaskSpec
from securefed.errors import ConfigError, PrivacyBudgetExceeded
from securefed.federation.local_training import LocalRoundResult, LocalTrainer, TrainingSettings, evaluate_model
from securefed.federation.training_settings import Optimizer
from securefed.models import ModelConfig, build_model
from securefed.primitives.identity import SiteIdentity
from securefed.privacy.dpsgd_config import DPSGDConfig
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger

torch.set_num_threads(1)
TABULAR = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(4,), spatial_dims=0, num_classes=2)
CPU = TrainingSettings(device="cpu", learning_rate=0.2, batch_size=8)


def _separable(n: int = 48, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return ArrayDataset(inputs=x, targets=(x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64))


def _mlp(seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(name="mlp", hidden=(8,)), TABULAR, seed=seed)


def _dp(**overrides: object) -> DPSGDConfig:
    settings = {"max_grad_norm": 1.0, "delta": 1e-3, "batch_size": 8, "noise_multiplier": 1.0,
                "steps_per_round": 3, "device": "cpu"} | overrides
    return DPSGDConfig(**settings)


def _ledger(tmp_path, epsilon: float = 50.0) -> PrivacyLedger:
    return PrivacyLedger.open_or_create(tmp_path / "site.ledger", identity=SiteIdentity.generate("site-a"),
                                        budget=PrivacyBudget(epsilon=epsilon, delta=1e-3))


def test_dp_round_charges_the_ledger_once_and_returns_local_minus_global(tmp_path) -> None:
    ledger = _ledger(tmp_path)
    model = _mlp()
    params = list(model.parameters())
    trainer = LocalTrainer(model=model, spec=TABULAR, train=_separable(), settings=CPU, dp=_dp(), ledger=ledger,
                           seed=11)
    start = len(ledger.entries())
    global_vector = trainer.get_vector()
    assert global_vector.dtype == np.float32 and global_vector.shape == (trainer.parameter_count(),) == (58,)
    results = []
    for round_ in (1, 2):
        global_vector = np.random.default_rng(round_).normal(size=global_vector.shape).astype(np.float32)
        result = trainer.train_round(global_vector, round_id=f"round-{round_}")
        results.append(result)
        assert isinstance(result, LocalRoundResult) and result.steps == 3 and result.examples == 48
        assert len(ledger.entries()) == start + round_
        assert ledger.entries()[-1].round_id == f"round-{round_}"
        assert result.update.dtype == np.float32 and np.any(result.update != 0)
        np.testing.assert_array_equal(result.update, trainer.get_vector() - global_vector)
        assert result.epsilon == pytest.approx(ledger.spent().epsilon) == pytest.approx(trainer.epsilon())
        assert math.isfinite(result.mean_loss)
        metrics = trainer.evaluate(global_vector + result.update, _separable(16, seed=9))  # between rounds
        assert set(metrics) == {"accuracy", "loss"} and len(ledger.entries()) == start + round_
    assert results[1].epsilon > results[0].epsilon
    assert all(a is b for a, b in zip(params, model.parameters()))  # loaded in place, hooks intact


def test_a_round_beyond_the_budget_is_refused_before_training(tmp_path) -> None:
    ledger = _ledger(tmp_path, epsilon=0.5)
    trainer = LocalTrainer(model=_mlp(), spec=TABULAR, train=_separable(), settings=CPU, dp=_dp(), ledger=ledger,
                           seed=1)
    entries = len(ledger.entries())
    with pytest.raises(PrivacyBudgetExceeded):
        trainer.train_round(trainer.get_vector(), round_id="round-1")
    assert len(ledger.entries()) == entries


def test_replaying_a_charged_round_reproduces_its_update(tmp_path) -> None:
    ledger = _ledger(tmp_path)
    first = LocalTrainer(model=_mlp(), spec=TABULAR, train=_separable(), settings=CPU, dp=_dp(), ledger=ledger,
                         seed=5)
    start = first.get_vector()
    update = first.train_round(start, round_id="round-1").update
    first.close()
    entries = len(ledger.entries())
    again = LocalTrainer(model=_mlp(), spec=TABULAR, train=_separable(), settings=CPU, dp=_dp(), ledger=ledger,
                         seed=5)
    replayed = again.train_round(start, round_id="round-1", replay_charged=True).update
    np.testing.assert_array_equal(replayed, update)
    assert len(ledger.entries()) == entries


def test_dp_segmentation_round_with_a_per_sample_loss() -> None:
    spec = TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=(1, 16, 16), spatial_dims=2, num_classes=2)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(12, 1, 16, 16)).astype(np.float32)
    data = ArrayDataset(inputs=images, targets=(images > 0.5).astype(np.int64))
    model = build_model(ModelConfig(name="unet", features=(2, 4)), spec, seed=0)
    trainer = LocalTrainer(model=model, spec=spec, train=data, settings=CPU,
                           dp=_dp(batch_size=4, steps_per_round=2, max_physical_batch_size=2), ledger=None, seed=3)
    result = trainer.train_round(trainer.get_vector(), round_id=1)
    assert result.steps == 2 and result.epsilon is not None and 0 < result.mean_loss < 2
    assert np.any(result.update != 0)


def test_plain_sgd_learns_a_separable_problem() -> None:
    train, test = _separable(96, seed=0), _separable(64, seed=1)
    trainer = LocalTrainer(model=_mlp(), spec=TABULAR, train=train, settings=CPU, dp=None, ledger=None, seed=0)
    vector = trainer.get_vector()
    before = trainer.evaluate(vector, test)
    losses = []
    for round_ in range(4):
        result = trainer.train_round(vector, round_id=f"r{round_}")
        assert result.epsilon is None and result.steps == 12  # one epoch: 96 / 8
        vector = vector + result.update
        losses.append(result.mean_loss)
    after = trainer.evaluate(vector, test)
    assert losses[-1] < losses[0]
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.9 > before["accuracy"]
    assert trainer.epsilon() is None


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_each_round_starts_with_fresh_optimizer_state(optimizer: str) -> None:
    settings = TrainingSettings(device="cpu", optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0,
                                learning_rate=0.05, batch_size=8, steps_per_round=4)
    assert settings.optimizer is Optimizer(optimizer)
    trainer = LocalTrainer(model=_mlp(), spec=TABULAR, train=_separable(), settings=settings, dp=None, ledger=None,
                           seed=2)
    vector = trainer.get_vector()
    one = trainer.train_round(vector, round_id="same").update
    two = trainer.train_round(vector, round_id="same").update  # leftover momentum would change this
    np.testing.assert_array_equal(one, two)
    other = trainer.train_round(vector, round_id="other").update  # other batches
    assert not np.array_equal(one, other)


def test_round_length_and_physical_batches_without_dp() -> None:
    data = _separable(40)
    epochs = TrainingSettings(device="cpu", batch_size=8, epochs_per_round=2.0)
    trainer = LocalTrainer(model=_mlp(), spec=TABULAR, train=data, settings=epochs, dp=None, ledger=None, seed=0)
    assert trainer.train_round(trainer.get_vector(), round_id="a").steps == 10
    whole = TrainingSettings(device="cpu", batch_size=8, steps_per_round=3)
    split = TrainingSettings(device="cpu", batch_size=8, steps_per_round=3, max_physical_batch_size=3)
    updates = []
    for settings in (whole, split):
        trainer = LocalTrainer(model=_mlp(), spec=TABULAR, train=data, settings=settings, dp=None, ledger=None, seed=0)
        updates.append(trainer.train_round(trainer.get_vector(), round_id="a").update)
    np.testing.assert_allclose(updates[0], updates[1], rtol=1e-5, atol=1e-6)  # chunks change memory, not math


def test_evaluate_accuracy_and_loss_of_a_known_model() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    spec = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(2,), spatial_dims=0, num_classes=2)
    vector = np.array([1, 0, 0, 1, 0, 0], dtype=np.float32)  # weight = identity, bias = 0: logits = inputs
    x = np.array([[2, 0], [0, 1], [3, 1], [0, 2], [1, 0]], dtype=np.float32)
    y = np.array([0, 1, 1, 1, 1])
    metrics = evaluate_model(model, spec, vector, ArrayDataset(inputs=x, targets=y), device="cpu")
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    log_softmax = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    assert metrics["loss"] == pytest.approx(-log_softmax[np.arange(5), y].mean(), rel=1e-6)
    assert model.training  # the mode is restored


def test_evaluate_foreground_dice_of_hand_made_masks() -> None:
    # logits: background 0, foreground = the input, so the prediction is "input > 0"
    model = nn.Conv2d(1, 2, 1)
    vector = np.array([0, 1, 0, 0], dtype=np.float32)  # weights (2, 1, 1, 1), then bias (2,)
    spec = TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=(1, 4, 4), spatial_dims=2, num_classes=2)
    x = -np.ones((3, 1, 4, 4), dtype=np.float32)
    target = np.zeros((3, 1, 4, 4), dtype=np.int64)
    x[0, 0, 0, :] = 1  # predicts 4 pixels; 2 of them are in a 3-pixel label: Dice 2*2/(4+3)
    target[0, 0, 0, :2] = 1
    target[0, 0, 1, 0] = 1
    # sample 1: nothing predicted and nothing labelled: Dice 1
    target[2, 0, 3, 3] = 1  # sample 2: a label the model misses entirely: Dice 0
    metrics = evaluate_model(model, spec, vector, ArrayDataset(inputs=x, targets=target), device="cpu")
    assert metrics["dice"] == pytest.approx((4 / 7 + 1 + 0) / 3)
    assert metrics["loss"] > 0 and math.isfinite(metrics["loss"])


def test_bad_arguments_are_config_errors(tmp_path) -> None:
    data = _separable()
    with pytest.raises(ConfigError, match="device 'cuda'.*'cpu'"):
        LocalTrainer(model=_mlp(), spec=TABULAR, train=data, settings=CPU, dp=_dp(device="cuda"), ledger=None, seed=0)
    with pytest.raises(ConfigError, match="without DP-SGD"):
        LocalTrainer(model=_mlp(), spec=TABULAR, train=data, settings=CPU, dp=None, ledger=_ledger(tmp_path), seed=0)
    wrong = ArrayDataset(inputs=np.zeros((4, 3), np.float32), targets=np.array([0, 1, 2, 0]))
    with pytest.raises(ConfigError) as info:
        LocalTrainer(model=_mlp(), spec=TABULAR, train=wrong, settings=CPU, dp=None, ledger=None, seed=0)
    assert len(info.value.problems) == 2  # the input shape and the class ids
    trainer = LocalTrainer(model=_mlp(), spec=TABULAR, train=data, settings=CPU, dp=None, ledger=None, seed=0)
    with pytest.raises(ConfigError, match=r"expected shape \(58,\)"):
        trainer.train_round(np.zeros(57, np.float32), round_id="a")
    with pytest.raises(ConfigError, match="NaN"):
        trainer.set_vector(np.full(58, np.nan, np.float32))
    auto = LocalTrainer(model=_mlp(), spec=TABULAR, train=data, settings=CPU, dp=_dp(device="auto"), ledger=None,
                        seed=0)
    assert auto.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("private", [True, False])
def test_a_round_on_cuda(private: bool) -> None:
    settings = TrainingSettings(device="cuda", learning_rate=0.2, batch_size=8)
    trainer = LocalTrainer(model=_mlp(), spec=TABULAR, train=_separable(), settings=settings,
                           dp=_dp(device="auto") if private else None, ledger=None, seed=0)
    assert trainer.device.type == "cuda" and all(p.is_cuda for p in trainer.model.parameters())
    vector = trainer.get_vector()
    result = trainer.train_round(vector, round_id="round-1")
    assert result.update.dtype == np.float32 and np.any(result.update != 0)
    assert set(trainer.evaluate(vector + result.update, _separable(16, seed=1))) == {"accuracy", "loss"}
