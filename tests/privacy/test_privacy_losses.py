"""Per-sample segmentation losses: checked against MONAI's losses and metrics and against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import compute_dice
from scipy.special import log_softmax

from securefed.errors import ConfigError
from securefed.privacy.losses import (
    LossReduction,
    dice_ce_loss,
    dice_score,
    per_sample_cross_entropy,
    per_sample_dice_loss,
)

torch.set_num_threads(1)

SHAPES = {"2d": (32, 32), "3d": (16, 16, 16)}


def _batch(spatial: tuple[int, ...], *, batch: int = 3, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, classes, *spatial), generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch, 1, *spatial), generator=generator)
    return logits, labels


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels[:, 0], classes).movedim(-1, 1).double()


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("one_hot", [False, True])
def test_dice_loss_matches_monai_per_sample(dims: str, include_background: bool, one_hot: bool) -> None:
    logits, labels = _batch(SHAPES[dims])
    target = _one_hot(labels, 3) if one_hot else labels
    ours = per_sample_dice_loss(logits, target, include_background=include_background)
    monai = DiceLoss(include_background=include_background, to_onehot_y=not one_hot, softmax=True,
                     reduction="none")(logits, target)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, monai.flatten(1).mean(dim=1), rtol=1e-10, atol=1e-12)


def test_binary_dice_on_probabilities_matches_monai_sigmoid() -> None:
    logits, labels = _batch(SHAPES["2d"], classes=1)
    mask = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    ours = per_sample_dice_loss(torch.sigmoid(logits), mask, softmax=False)
    monai = DiceLoss(sigmoid=True, reduction="none")(logits, mask)
    torch.testing.assert_close(ours, monai.flatten(1).mean(dim=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", SHAPES)
def test_cross_entropy_is_voxel_mean_per_sample(dims: str) -> None:
    logits, labels = _batch(SHAPES[dims])
    ours = per_sample_cross_entropy(logits, labels)
    log_p = log_softmax(logits.numpy(), axis=1)
    picked = np.take_along_axis(log_p, labels.numpy(), axis=1)  # (B, 1, *spatial)
    expected = -picked.reshape(picked.shape[0], -1).mean(axis=1)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(per_sample_cross_entropy(logits, _one_hot(labels, 3)), ours)


@pytest.mark.parametrize("dims", SHAPES)
def test_batch_losses_equal_each_sample_alone(dims: str) -> None:
    logits, labels = _batch(SHAPES[dims], batch=4)
    for loss in (per_sample_dice_loss, per_sample_cross_entropy,
                 lambda x, y: dice_ce_loss(x, y, reduction="none"), dice_score):
        batched = loss(logits, labels)
        alone = torch.cat([loss(logits[i:i + 1], labels[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(batched, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", SHAPES)
def test_dice_ce_matches_monai_value_and_gradient(dims: str) -> None:
    logits, labels = _batch(SHAPES[dims])
    ours_input = logits.clone().requires_grad_(True)
    monai_input = logits.clone().requires_grad_(True)
    ours = dice_ce_loss(ours_input, labels)
    monai = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False,
                       lambda_dice=0.5, lambda_ce=0.5)(monai_input, labels)
    ours.backward()
    monai.backward()
    torch.testing.assert_close(ours, monai, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_input.grad, monai_input.grad, rtol=1e-8, atol=1e-14)


def test_gradient_of_batch_mean_is_mean_of_sample_gradients() -> None:
    logits, labels = _batch(SHAPES["2d"], batch=4)
    batched = logits.clone().requires_grad_(True)
    dice_ce_loss(batched, labels, reduction=LossReduction.MEAN).backward()
    for i in range(4):
        alone = logits[i:i + 1].clone().requires_grad_(True)
        dice_ce_loss(alone, labels[i:i + 1]).backward()
        torch.testing.assert_close(batched.grad[i:i + 1] * 4, alone.grad, rtol=1e-10, atol=1e-14)


def test_reductions() -> None:
    logits, labels = _batch(SHAPES["2d"])
    per_sample = dice_ce_loss(logits, labels, reduction="none")
    assert per_sample.shape == (3,)
    torch.testing.assert_close(dice_ce_loss(logits, labels, reduction="sum"), per_sample.sum())
    torch.testing.assert_close(dice_ce_loss(logits, labels), per_sample.mean())


@pytest.mark.parametrize("dims", SHAPES)
def test_perfect_prediction(dims: str) -> None:
    _, labels = _batch(SHAPES[dims], classes=4)
    labels[labels == 3] = 2  # class 3 absent from the label and the prediction: still perfect
    logits = 40.0 * _one_hot(labels, 4)
    assert per_sample_dice_loss(logits, labels).abs().max() < 1e-6
    assert per_sample_dice_loss(logits, labels, include_background=True).abs().max() < 1e-6
    torch.testing.assert_close(dice_score(logits, labels), torch.ones(3, dtype=torch.float64))
    worst = dice_score(40.0 * _one_hot((labels + 1) % 3, 4), labels)
    torch.testing.assert_close(worst, torch.full((3,), 1 / 3, dtype=torch.float64))  # only class 3 "matches"


@pytest.mark.parametrize("include_background", [False, True])
def test_dice_score_matches_monai_metric(include_background: bool) -> None:
    logits, labels = _batch(SHAPES["3d"], classes=4)
    ours = dice_score(logits, labels, include_background=include_background)
    prediction = _one_hot(logits.argmax(dim=1, keepdim=True), 4)
    monai = compute_dice(prediction, _one_hot(labels, 4), include_background=include_background,
                         ignore_empty=False)
    torch.testing.assert_close(ours, monai.mean(dim=1))
    assert not dice_score(logits.requires_grad_(True), labels).requires_grad


def test_single_channel_score_thresholds_logits() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # prediction {0, 2}, label {0, 1}: overlap 1, sizes 2 + 2
    torch.testing.assert_close(dice_score(logits, mask), torch.tensor([0.5]))


def test_bad_inputs_report_every_problem() -> None:
    logits, labels = _batch(SHAPES["2d"])
    with pytest.raises(ConfigError) as caught:
        per_sample_dice_loss(logits, labels[:, :, :8], smooth=-1)
    assert len(caught.value.problems) == 2
    assert "(3, 1, 32, 32)" in str(caught.value) and "smooth" in str(caught.value)
    with pytest.raises(ConfigError, match="float tensor"):
        per_sample_cross_entropy(logits[:, :, 0], labels[:, :, 0])
    with pytest.raises(ConfigError, match=r"whole numbers in \[0, 2\]"):
        per_sample_dice_loss(logits, labels + 1)
    with pytest.raises(ConfigError, match="whole numbers"):
        per_sample_cross_entropy(logits, labels.double() + 0.5)
    with pytest.raises(ConfigError, match="sigmoid"):
        per_sample_dice_loss(logits[:, :1], labels)
    with pytest.raises(ConfigError, match="binary cross-entropy"):
        per_sample_cross_entropy(logits[:, :1], labels.clamp(max=1))
    with pytest.raises(ConfigError, match="loss_reduction"):
        dice_ce_loss(logits, labels, reduction="average")
    with pytest.raises(ConfigError, match="must be a torch.Tensor"):
        dice_score(logits.numpy(), labels)
