"""One DP-SGD step against one non-private step of the same model, on one CPU thread.

Models: MONAI DenseNet121 2D (1 channel, 64 x 64, batch 16, cross-entropy) and MONAI UNet 2D
(channels 16-32-64-128, strides 2-2-2, 64 x 64, batch 16, per-sample Dice + CE), both made
DP-compatible by :func:`securefed.privacy.model_compat.make_dp_compatible` (BatchNorm ->
GroupNorm, in-place activations off). A step is forward, backward, clipping, noise and the
optimiser's update. Modes:

* ``non-private``: the baseline, ``loss.mean().backward(); sgd.step()``;
* ``opacus-hooks``: Opacus' default per-sample mode (``GradSampleModule`` + ``DPOptimizer``);
* ``opacus-ghost``: Opacus' fast gradient clipping (two backward passes; ghost norms for Linear
  only, per-sample gradients for convolutions);
* ``securefed-fast``: :class:`securefed.privacy.fast_clipping.BookKeepingClipper` (one backward,
  mixed ghost clipping) with Opacus' ``DPOptimizerFastGradientClipping`` adding the noise, as
  ``make_private(clipping="fast")`` runs it.

ratio = DP step time / non-private step time, the fastest of a few rounds each; the baseline is
timed before and after the mode, in the same test. Target for ``securefed-fast``: <= 2.0; the
Opacus rows are informational. ``test_fast_never_slower_than_opacus_default`` times the two
against each other (target: ratio <= 1.0).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

monai_nets = pytest.importorskip("monai.networks.nets")
opacus = pytest.importorskip("opacus")

from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping  # noqa: E402
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping  # noqa: E402

from securefed.privacy.fast_clipping import BookKeepingClipper  # noqa: E402
from securefed.privacy.losses import dice_ce_loss  # noqa: E402
from securefed.privacy.model_compat import make_dp_compatible  # noqa: E402

torch.set_num_threads(1)
# Opacus' hooks warn on every step that the first layer's input needs no gradient: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

BATCH = 16
SIDE = 64
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 0.01
TARGET_VS_NON_PRIVATE = 2.0
# (warm-up rounds, timed rounds, baseline rounds before and after); DenseNet121 takes ~0.4 s a
# non-private step on one thread, the UNet ~30 ms
ROUNDS = {"densenet121": (1, 4, 2), "unet": (2, 10, 4)}
MODES = ["opacus-hooks", "opacus-ghost", "securefed-fast"]


def _densenet121() -> torch.nn.Module:
    return monai_nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)


def _unet() -> torch.nn.Module:
    return monai_nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128),
                           strides=(2, 2, 2))


def _classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _segmentation_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return dice_ce_loss(logits, labels, reduction="none")


MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable]] = {
    "densenet121": (_densenet121, _classification_losses),
    "unet": (_unet, _segmentation_losses),
}


def _batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(20240601)
    images = torch.randn(BATCH, 1, SIDE, SIDE, generator=gen)
    if name == "densenet121":
        return images, torch.randint(0, 2, (BATCH,), generator=gen)
    return images, torch.randint(0, 2, (BATCH, 1, SIDE, SIDE), generator=gen)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)  # every mode starts from the same weights
    model, report = make_dp_compatible(MODELS[name][0]())
    assert report.ok, report.summary()
    return model.train()


def _step(name: str, mode: str) -> tuple[Callable[[], None], object]:
    """A closure running one full training step of ``mode``, and the clipper (or None)."""
    model = _model(name)
    losses_of = MODELS[name][1]
    images, labels = _batch(name)
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    noise = dict(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=BATCH,
                 generator=torch.Generator().manual_seed(7))
    if mode == "non-private":
        def step() -> None:
            sgd.zero_grad()
            losses_of(model(images), labels).mean().backward()
            sgd.step()
        return step, None
    if mode == "opacus-hooks":
        wrapped = GradSampleModule(model)
        dp = DPOptimizer(sgd, **noise)

        def step() -> None:
            dp.zero_grad()
            losses_of(wrapped(images), labels).mean().backward()
            dp.step()
        return step, None
    if mode == "opacus-ghost":
        wrapped = GradSampleModuleFastGradientClipping(model, max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True)
        dp = DPOptimizerFastGradientClipping(sgd, **noise)

        def step() -> None:
            dp.zero_grad()
            DPTensorFastGradientClipping(wrapped, dp, losses_of(wrapped(images), labels), "mean").backward()
            dp.step()
        return step, None
    clipper = BookKeepingClipper(model, max_grad_norm=MAX_GRAD_NORM)
    dp = DPOptimizerFastGradientClipping(sgd, **noise)

    def step() -> None:
        dp.zero_grad()
        clipper.backward(losses_of(model(images), labels))
        dp.step()
    return step, clipper


def _fastest(step: Callable[[], None], rounds: int) -> float:
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def _plans(clipper: object) -> dict[str, int]:
    if clipper is None:
        return {}
    return dict(Counter(plan.value for plan in clipper.last_plans.values()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_dp_step_vs_non_private(benchmark, run_pedantic, report, name, mode):
    benchmark.group = f"dpsgd: {name}, batch {BATCH}, {SIDE}x{SIDE}, 1 thread"
    warmup, rounds, base_rounds = ROUNDS[name]
    baseline_step, _ = _step(name, "non-private")
    private_step, clipper = _step(name, mode)
    for _ in range(warmup):
        baseline_step()
    before = _fastest(baseline_step, base_rounds)
    _, ours = run_pedantic(private_step, rounds=rounds, warmup_rounds=warmup)
    baseline = min(before, _fastest(baseline_step, base_rounds))
    target = ("<=", TARGET_VS_NON_PRIVATE) if mode == "securefed-fast" else None
    report(name=f"dpsgd {name}: {mode} / non-private", ours=ours, baseline=baseline, ratio=ours / baseline,
           ratio_means="dp step / non-private step", target=target, threads=torch.get_num_threads(),
           layer_plans=_plans(clipper))


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_never_slower_than_opacus_default(benchmark, run_pedantic, report, name):
    benchmark.group = f"dpsgd: {name}, batch {BATCH}, {SIDE}x{SIDE}, 1 thread"
    warmup, rounds, _ = ROUNDS[name]
    opacus_step, _ = _step(name, "opacus-hooks")
    fast_step, _ = _step(name, "securefed-fast")
    for _ in range(warmup):
        opacus_step()
    before = _fastest(opacus_step, rounds // 2)
    _, ours = run_pedantic(fast_step, rounds=rounds, warmup_rounds=warmup)
    baseline = min(before, _fastest(opacus_step, rounds - rounds // 2))
    report(name=f"dpsgd {name}: securefed-fast / opacus-hooks", ours=ours, baseline=baseline,
           ratio=ours / baseline, ratio_means="fast step / opacus default step", target=("<=", 1.0),
           threads=torch.get_num_threads())


def test_train_round_through_make_private(benchmark, run_pedantic, report):
    """The whole path a site runs: make_private's round (Poisson sampling, the ledger-free charge,
    the per-round loss probe, clipping as AUTO picks it, noise, step) against a plain non-private
    loop over the same number of batches of the expected size."""
    from securefed.privacy import DPSGDConfig, make_private

    benchmark.group = "dpsgd: one round of 8 steps through make_private (unet)"
    steps, n = 8, 10 * BATCH
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(n, 1, SIDE, SIDE, generator=gen)
    labels = torch.randint(0, 2, (n, 1, SIDE, SIDE), generator=gen)
    dataset = torch.utils.data.TensorDataset(images, labels)
    plain = _model("unet")
    sgd = torch.optim.SGD(plain.parameters(), lr=LR)

    def non_private_round() -> None:
        for k in range(steps):
            sgd.zero_grad()
            x, y = images[k * BATCH:(k + 1) * BATCH], labels[k * BATCH:(k + 1) * BATCH]
            _segmentation_losses(plain(x), y).mean().backward()
            sgd.step()

    config = DPSGDConfig(noise_multiplier=NOISE_MULTIPLIER, delta=1e-5, max_grad_norm=MAX_GRAD_NORM,
                         batch_size=BATCH, steps_per_round=steps, planned_rounds=1000)
    training = make_private(_model("unet"), lambda ps: torch.optim.SGD(ps, lr=LR), dataset, config=config, seed=5)
    rounds = iter(range(10**6))
    baseline = _fastest(non_private_round, 3)
    _, ours = run_pedantic(lambda: training.train_round(_segmentation_losses, round_id=next(rounds)),
                           rounds=3, warmup_rounds=1)
    baseline = min(baseline, _fastest(non_private_round, 2))
    report(name=f"dpsgd unet: make_private round ({training.clipping.value}) / non-private",
           ours=ours, baseline=baseline, ratio=ours / baseline, ratio_means="dp round / non-private round",
           target=("<=", TARGET_VS_NON_PRIVATE), steps=steps,
           notes=["Poisson batches vary around the expected size; the baseline uses exactly that size"])
