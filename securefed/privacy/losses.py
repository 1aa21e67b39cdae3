"""Per-sample segmentation losses for DP-SGD.

DP-SGD (Abadi et al. 2016) clips every sample's gradient, so Opacus needs the loss of each sample
on its own and one known reduction over the batch: the privacy engine is told the reduction
(``loss_reduction="mean"`` or ``"sum"``) and rescales the per-sample gradients it captures by it.
A loss that pools statistics over the whole batch - MONAI's ``DiceLoss(batch=True)``, or a Dice
computed over all voxels of all images at once - is not a sum of per-sample terms, so the
"per-sample" gradients Opacus computes for it would still depend on the other patients. Every loss
here is first computed per sample (shape ``[B]``) and only then reduced.

* Soft Dice (Milletari et al. 2016, "V-Net"): per sample and class,
  ``1 - (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)``, averaged over classes; the same
  smoothing in numerator and denominator as MONAI's ``DiceLoss`` (Cardoso et al. 2022), so an
  organ absent from both prediction and label costs nothing.
* Cross-entropy: averaged over the voxels of each sample, so a sample's weight does not depend on
  the batch it landed in.
* Dice + CE: their average, the usual combination for nnU-Net-style training (Isensee et al. 2021).

``logits`` are ``(B, C, H, W)`` or ``(B, C, H, W, D)``; ``target`` is either class indices of shape
``(B, 1, ...)`` (integer, or float holding integers) or one-hot / soft labels of the same shape as
``logits``. A single output channel is read as binary foreground (MONAI's convention), so
``include_background`` does not apply to it.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "LossReduction",
    "per_sample_dice_loss",
    "per_sample_cross_entropy",
    "dice_ce_loss",
    "dice_score",
]


class LossReduction(Enum):
    """How per-sample losses become the batch loss; must match the privacy engine's loss_reduction."""

    MEAN = "mean"
    SUM = "sum"
    NONE = "none"  # the per-sample vector itself


def per_sample_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    softmax: bool = True,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice loss of each sample, shape ``[B]``.

    With ``softmax=False`` ``logits`` must already be probabilities (e.g. ``torch.sigmoid`` of a
    single-channel output). The background (channel 0) is left out unless ``include_background``.
    """
    problems = _shape_problems(logits, target)
    if not isinstance(smooth, (int, float)) or isinstance(smooth, bool) or not smooth >= 0:
        problems.append(f"smooth must be a number >= 0, got {smooth!r}")
    if softmax and not problems and logits.shape[1] == 1:
        problems.append("softmax over a single channel is always 1; for binary segmentation pass "
                        "probabilities (torch.sigmoid(logits)) with softmax=False")
    if problems:
        raise ConfigError(problems)
    probabilities = torch.softmax(logits, dim=1) if softmax else logits
    one_hot = _one_hot(target, logits)
    return 1.0 - _per_class_dice(probabilities, one_hot, include_background, smooth).mean(dim=1)


def per_sample_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the voxels of each sample, shape ``[B]``.

    Needs at least two channels; for a single sigmoid channel use binary cross-entropy.
    """
    problems = _shape_problems(logits, target)
    if not problems and logits.shape[1] < 2:
        problems.append("cross-entropy needs at least 2 output channels (background + foreground); "
                        "for a single sigmoid channel use binary cross-entropy")
    if problems:
        raise ConfigError(problems)
    spatial = tuple(range(1, logits.dim() - 1))
    if target.shape[1] == logits.shape[1]:  # one-hot or soft labels: CE with class probabilities
        voxel_losses = F.cross_entropy(logits, target.to(logits.dtype), reduction="none")
    else:
        _check_indices(target, logits.shape[1])
        voxel_losses = F.cross_entropy(logits, target[:, 0].long(), reduction="none")
    return voxel_losses.mean(dim=spatial)


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: LossReduction | str = LossReduction.MEAN,
    include_background: bool = False,
) -> torch.Tensor:
    """``(Dice + CE) / 2`` of each sample (softmax Dice), then reduced over the batch.

    Use ``reduction="mean"`` with Opacus' default ``loss_reduction="mean"`` and ``"sum"`` with
    ``loss_reduction="sum"``; ``"none"`` returns the ``[B]`` vector.
    """
    how = _reduction(reduction)
    per_sample = 0.5 * (per_sample_dice_loss(logits, target, include_background=include_background)
                        + per_sample_cross_entropy(logits, target))
    if how is LossReduction.MEAN:
        return per_sample.mean()
    if how is LossReduction.SUM:
        return per_sample.sum()
    return per_sample


@torch.no_grad()
def dice_score(
    logits: torch.Tensor, target: torch.Tensor, *, include_background: bool = False
) -> torch.Tensor:
    """Hard Dice coefficient of each sample, shape ``[B]``, in ``[0, 1]`` (a metric, no gradient).

    The prediction is the arg-max class (or ``logit > 0`` for a single channel); a class absent from
    both prediction and label scores 1, so a perfect prediction always scores 1.
    """
    problems = _shape_problems(logits, target)
    if problems:
        raise ConfigError(problems)
    channels = logits.shape[1]
    if channels == 1:
        predicted = (logits > 0).to(logits.dtype)
    else:
        predicted = F.one_hot(logits.argmax(dim=1), channels).movedim(-1, 1).to(logits.dtype)
    labels = (_one_hot(target, logits) > 0.5).to(logits.dtype)  # soft labels are thresholded
    return _per_class_dice(predicted, labels, include_background, 0.0).mean(dim=1)


def _per_class_dice(
    prediction: torch.Tensor, one_hot: torch.Tensor, include_background: bool, smooth: float
) -> torch.Tensor:
    """Dice of each sample and class, shape ``[B, classes]``; empty-vs-empty counts as 1."""
    if not include_background and prediction.shape[1] > 1:
        prediction, one_hot = prediction[:, 1:], one_hot[:, 1:]
    spatial = tuple(range(2, prediction.dim()))
    overlap = (prediction * one_hot).sum(dim=spatial)
    total = prediction.sum(dim=spatial) + one_hot.sum(dim=spatial)
    if smooth > 0:
        return (2.0 * overlap + smooth) / (total + smooth)
    return torch.where(total > 0, 2.0 * overlap / total.clamp_min(torch.finfo(total.dtype).tiny),
                       torch.ones_like(total))


def _shape_problems(logits: object, target: object) -> list[str]:
    problems = []
    for name, value in (("logits", logits), ("target", target)):
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if problems or not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        return problems
    if logits.dim() not in (4, 5) or not logits.is_floating_point():
        problems.append("logits must be a float tensor shaped (B, C, H, W) or (B, C, H, W, D), got "
                        f"{logits.dtype} {tuple(logits.shape)}")
        return problems
    batch, channels, *spatial = logits.shape
    if target.dim() != logits.dim() or target.shape[0] != batch or list(target.shape[2:]) != spatial \
            or target.shape[1] not in (1, channels):
        problems.append(
            f"target must be class indices shaped {(batch, 1, *spatial)} or one-hot labels shaped "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    return problems


def _check_indices(target: torch.Tensor, channels: int) -> None:
    if target.dtype == torch.bool:
        return  # a binary mask: 0 and 1 are valid classes whenever there are 2 or more channels
    bad = (target < 0) | (target >= channels)
    if target.is_floating_point():
        bad = bad | (target != target.round())
    if bool(bad.any()):
        raise ConfigError(f"class-index target must hold whole numbers in [0, {channels - 1}] "
                          f"(one per output channel); check the label map or out_channels")


def _one_hot(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    channels = logits.shape[1]
    if target.shape[1] == channels:  # already one-hot (or a binary mask for a single channel)
        return target.to(logits.dtype)
    _check_indices(target, channels)
    return F.one_hot(target[:, 0].long(), channels).movedim(-1, 1).to(logits.dtype)


def _reduction(reduction: LossReduction | str) -> LossReduction:
    if isinstance(reduction, LossReduction):
        return reduction
    try:
        return LossReduction(reduction)
    except ValueError:
        choices = ", ".join(repr(r.value) for r in LossReduction)
        raise ConfigError(f"reduction must be one of {choices} (matching the privacy engine's "
                          f"loss_reduction), got {reduction!r}") from None
