"""Notebook helpers: epsilon() and noise_multiplier_for()."""

from __future__ import annotations

import itertools

import pytest

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import pld_privacy_accountant as reference_pld  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant as reference_rdp  # noqa: E402

from securefed.errors import ConfigError, PrivacyError  # noqa: E402
from securefed.privacy.calibration import epsilon, noise_multiplier_for  # noqa: E402

TARGETS = (0.5, 1.0, 3.0, 8.0)
DELTA = 1e-5


def reference_epsilon(accountant, noise: float, rate: float, steps: int, delta: float) -> float:
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("rate", "steps"), [(0.001, 10000), (0.01, 1000), (0.1, 100), (1.0, 10), (0.004, 2500)])
def test_rdp_calibration_lands_in_the_band(rate: float, steps: int) -> None:
    for target in TARGETS:
        noise = noise_multiplier_for(target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps)
        spent = epsilon(noise_multiplier=noise, sample_rate=rate, steps=steps, delta=DELTA)
        assert 0.99 * target <= spent <= target, (target, noise, spent)


@pytest.mark.parametrize(("rate", "steps", "target"), [(0.01, 1000, 1.0), (0.1, 100, 8.0), (0.001, 10000, 0.5)])
def test_rdp_calibration_checked_by_dp_accounting(rate: float, steps: int, target: float) -> None:
    noise = noise_multiplier_for(target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps)
    theirs = reference_epsilon(reference_rdp.RdpAccountant(), noise, rate, steps, DELTA)
    assert 0.98 * target <= theirs <= 1.01 * target


@pytest.mark.parametrize(("rate", "steps", "target"), [(0.01, 1000, 1.0), (0.1, 100, 8.0), (1.0, 10, 3.0),
                                                       (0.02, 300, 0.5)])
def test_pld_calibration_lands_in_the_band_and_is_checked_by_dp_accounting(rate: float, steps: int,
                                                                          target: float) -> None:
    noise = noise_multiplier_for(target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps, accountant="pld")
    spent = epsilon(noise_multiplier=noise, sample_rate=rate, steps=steps, delta=DELTA, accountant="pld")
    assert 0.99 * target <= spent <= target
    theirs = reference_epsilon(reference_pld.PLDAccountant(), noise, rate, steps, DELTA)
    assert 0.98 * target <= theirs <= 1.01 * target
    # PLD is tighter, so it needs less noise than RDP for the same target.
    assert noise < noise_multiplier_for(target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps)


def test_epsilon_helper_agrees_with_dp_accounting() -> None:
    mine = epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=DELTA)
    theirs = reference_epsilon(reference_rdp.RdpAccountant(), 1.1, 0.01, 1000, DELTA)
    assert mine == pytest.approx(theirs, rel=0.01)
    assert epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=DELTA, accountant="prv") < mine


def test_unreachable_target_is_a_privacy_error() -> None:
    # 10^4 full-batch steps: even noise 10^4 (noise 100 per composed Gaussian) spends more than 1e-4.
    with pytest.raises(PrivacyError, match="out of reach"):
        noise_multiplier_for(target_epsilon=1e-4, delta=DELTA, sample_rate=1.0, steps=10000)


def check_calibration_grid(accountant: str, targets, deltas, rates, steps_list) -> int:
    """Every call lands in the band or raises a typed error (never anything else); returns hits."""
    landed = 0
    for target, delta, rate, steps in itertools.product(targets, deltas, rates, steps_list):
        try:
            noise = noise_multiplier_for(target_epsilon=target, delta=delta, sample_rate=rate, steps=steps,
                                         accountant=accountant)
        except (PrivacyError, ConfigError):
            continue
        spent = epsilon(noise_multiplier=noise, sample_rate=rate, steps=steps, delta=delta, accountant=accountant)
        assert 0.99 * target <= spent <= target, (target, delta, rate, steps, noise, spent)
        landed += 1
    return landed


def test_rdp_calibration_lands_or_refuses_across_a_broad_grid() -> None:
    # Includes epsilon exactly 0 during bracketing (delta above the total variation), which
    # once crashed in math.log(0).
    landed = check_calibration_grid("rdp", (0.3, 1.0, 3.0, 8.0, 30.0), (1e-12, 1e-5, 0.05),
                                    (1e-5, 0.001, 0.02, 1.0), (1, 100, 10000))
    assert landed >= 150


@pytest.mark.parametrize(("accountant", "target", "delta", "rate", "steps"), [
    ("rdp", 1.0, 1e-5, 1e-5, 1),  # epsilon 0 while bracketing: math.log(0)
    ("pld", 3.0, 0.05, 0.02, 1),  # tiny noise: e^(top loss) overflowed
    ("pld", 0.3, 0.05, 0.001, 100),
])
def test_former_crashes_land_or_refuse(accountant: str, target: float, delta: float, rate: float, steps: int) -> None:
    check_calibration_grid(accountant, (target,), (delta,), (rate,), (steps,))


@pytest.mark.slow
def test_pld_calibration_lands_or_refuses_across_a_grid() -> None:
    landed = check_calibration_grid("pld", (1.0, 8.0), (1e-12, 0.05), (0.001, 0.02, 1.0), (1, 100))
    assert landed >= 15


BAD_EPSILON_ARGUMENTS = {
    "noise_multiplier": [0.0, -1.0, float("nan"), "1"],
    "sample_rate": [0.0, 1.5, -0.1, None],
    "steps": [0, -5, 2.0, True],
    "delta": [0.0, 1.0, 2e0, float("inf")],
    "accountant": ["moments", 3],
}
GOOD = dict(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5, accountant="rdp")


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in BAD_EPSILON_ARGUMENTS.items() for v in vs])
def test_each_bad_argument_is_a_config_error(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=name):
        epsilon(**{**GOOD, name: value})
    if name != "noise_multiplier":
        good_target = {k: v for k, v in GOOD.items() if k != "noise_multiplier"}
        with pytest.raises(ConfigError, match=name):
            noise_multiplier_for(target_epsilon=1.0, **{**good_target, name: value})


@pytest.mark.parametrize("target", [0.0, -1.0, 100.5, 1e9, float("inf"), float("nan")])
def test_bad_targets_are_config_errors(target: float) -> None:
    with pytest.raises(ConfigError, match="target_epsilon"):
        noise_multiplier_for(target_epsilon=target, delta=1e-5, sample_rate=0.01, steps=100)


def test_absurd_target_says_why() -> None:
    with pytest.raises(ConfigError, match="meaningless"):
        noise_multiplier_for(target_epsilon=500.0, delta=1e-5, sample_rate=0.01, steps=100)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        epsilon(noise_multiplier=-1.0, sample_rate=2.0, steps=0, delta=1.5, accountant="nope")
    assert len(caught.value.problems) == 5
    for name, problem in itertools.zip_longest(
            ["noise_multiplier", "delta", "sample_rate", "steps", "accountant"], caught.value.problems):
        assert problem.startswith(name), problem
    with pytest.raises(ConfigError) as caught:
        noise_multiplier_for(target_epsilon=1000.0, delta=0.0, sample_rate=0.0, steps=-1, accountant="x")
    assert len(caught.value.problems) == 5
