"""Site-level clipping, central Gaussian noise and site sampling."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from securefed.errors import ConfigError, PrivacyError
from securefed.primitives.randomness import SeededRandom
from securefed.privacy.events import PoissonSampledGaussian, PrivacyUnit
from securefed.privacy.site_dp import (
    CentralDPConfig,
    NoiseMode,
    SamplingVisibility,
    SiteSampling,
    add_central_noise,
    central_event,
    clip_update,
    noise_mode,
    sample_sites,
    sampling_visibility,
)


def _reference_epsilon(event: PoissonSampledGaussian, delta: float) -> float:
    """Epsilon of an event by Google's dp_accounting (an independent implementation)."""
    accountant = RdpAccountant()
    gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
    sampled = dp_accounting.PoissonSampledDpEvent(event.sample_rate, gaussian)
    accountant.compose(dp_accounting.SelfComposedDpEvent(sampled, event.steps))
    return accountant.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------
# Clipping


def test_clip_scales_long_updates_down_to_the_bound() -> None:
    update = np.random.default_rng(0).normal(size=500) * 3
    clipped, was_clipped = clip_update(update, 2.5)
    assert was_clipped
    assert np.linalg.norm(clipped) == pytest.approx(2.5, rel=1e-14)
    # Same direction: parallel to the input.
    assert np.dot(clipped, update) / (np.linalg.norm(clipped) * np.linalg.norm(update)) == pytest.approx(1.0)


def test_clip_leaves_short_updates_alone() -> None:
    update = np.array([0.3, -0.4], dtype=np.float32)
    clipped, was_clipped = clip_update(update, 1.0)
    assert not was_clipped and clipped.dtype == np.float64
    np.testing.assert_array_equal(clipped, update.astype(np.float64))
    zeros, was_clipped = clip_update(np.zeros(4), 1.0)
    assert not was_clipped and not zeros.any()


def test_clip_handles_entries_whose_squares_overflow() -> None:
    clipped, was_clipped = clip_update(np.array([3e200, -4e200]), 1.0)
    assert was_clipped
    np.testing.assert_allclose(clipped, [0.6, -0.8], rtol=1e-14)


def test_clip_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="index 1"):
        clip_update(np.array([1.0, np.inf, np.nan]), 1.0)
    with pytest.raises(ConfigError, match="l2_clip"):
        clip_update(np.ones(3), 0.0)
    with pytest.raises(ConfigError, match="1-D"):
        clip_update(np.ones((2, 2)), 1.0)
    with pytest.raises(ConfigError, match="numeric"):
        clip_update(np.array(["a"]), 1.0)


# ---------------------------------------------------------------------------------------------
# Central noise


def test_central_noise_has_the_configured_gaussian_distribution() -> None:
    config = CentralDPConfig(l2_clip=2.0, noise_multiplier=1.5)
    total = np.linspace(-5, 5, 200_001)
    noisy = add_central_noise(total, config, rng=SeededRandom("central"), mode=NoiseMode.CENTRAL)
    noise = noisy - total
    std = 1.5 * 2.0
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)
    assert abs(np.mean(noise**2) / std**2 - 1) < 5 * math.sqrt(2 / noise.size)
    assert stats.kstest(noise / std, "norm").pvalue > 1e-4
    again = add_central_noise(total, config, rng=SeededRandom("central"), mode="central")
    np.testing.assert_array_equal(noisy, again)


def test_central_noise_needs_the_explicit_opt_in() -> None:
    config = CentralDPConfig(l2_clip=1.0, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="NoiseMode.CENTRAL"):
        add_central_noise(np.zeros(3), config, rng=SeededRandom(0), mode=NoiseMode.DISTRIBUTED)
    with pytest.raises(ConfigError) as info:
        add_central_noise(np.zeros(3), "config", rng=None, mode="sideways")  # type: ignore[arg-type]
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="NaN"):
        add_central_noise(np.array([np.nan]), config, rng=SeededRandom(0), mode=NoiseMode.CENTRAL)


def test_central_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        CentralDPConfig()
    assert [p.split(" ")[1] for p in info.value.problems] == ["l2_clip", "noise_multiplier"]
    with pytest.raises(ConfigError) as info:
        CentralDPConfig(l2_clip=-1.0, noise_multiplier=float("nan"))
    assert len(info.value.problems) == 2
    assert CentralDPConfig(l2_clip=2.0, noise_multiplier=0.5).noise_std == 1.0


# ---------------------------------------------------------------------------------------------
# Events and sampling


def test_central_event_is_site_level_and_amplified_only_by_hidden_sampling() -> None:
    config = CentralDPConfig(l2_clip=1.0, noise_multiplier=1.1)
    plain = central_event(config, steps=50)
    assert plain.unit is PrivacyUnit.SITE and plain.sample_rate == 1.0 and plain.steps == 50
    assert plain.noise_multiplier == 1.1
    hidden = central_event(config, steps=50, sampling=SiteSampling(rate=0.1, visibility=SamplingVisibility.HIDDEN_RANDOM))
    public = central_event(config, steps=50, sampling=SiteSampling(rate=0.1, visibility=SamplingVisibility.PUBLIC_OR_FIXED))
    assert hidden.sample_rate == 0.1 and public.sample_rate == 1.0
    # What the difference is worth, by an independent accountant.
    assert _reference_epsilon(hidden, 1e-5) < 0.25 * _reference_epsilon(public, 1e-5)
    # No back door: a bare rate cannot claim amplification without hidden sampling.
    with pytest.raises(TypeError, match="sample_rate"):
        central_event(config, sample_rate=0.2)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="sampling must be a SiteSampling"):
        central_event(config, sampling=0.2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        central_event("config")  # type: ignore[arg-type]


def test_hidden_sampling_is_poisson() -> None:
    names = [f"site-{i:02d}" for i in range(40)]
    sampling = SiteSampling(rate=0.3, visibility="hidden-random")
    rng = SeededRandom("poisson")
    rounds = [sample_sites(names, sampling, rng) for _ in range(2000)]
    # Counts per round follow Binomial(40, 0.3).
    counts = np.bincount([len(r) for r in rounds], minlength=41)
    pmf = stats.binom.pmf(np.arange(41), 40, 0.3)
    central = pmf * len(rounds) >= 5
    observed = np.append(counts[central], counts[~central].sum())
    expected = np.append(pmf[central], pmf[~central].sum()) * len(rounds)
    assert stats.chisquare(observed, expected).pvalue > 1e-4
    # Every site is equally likely, and the selection keeps the input order.
    per_site = np.array([sum(name in r for r in rounds) for name in names])
    assert np.all(np.abs(per_site / len(rounds) - 0.3) < 5 * math.sqrt(0.21 / len(rounds)))
    assert all(r == sorted(r) for r in rounds)
    # Two sites are chosen independently: P(both) = 0.09.
    both = sum(("site-00" in r) and ("site-01" in r) for r in rounds) / len(rounds)
    assert abs(both - 0.09) < 5 * math.sqrt(0.09 * 0.91 / len(rounds))


def test_sampling_accounted_rate_and_edge_cases() -> None:
    assert SiteSampling(rate=0.2, visibility=SamplingVisibility.HIDDEN_RANDOM).accounted_rate == 0.2
    assert SiteSampling(rate=0.2, visibility=SamplingVisibility.PUBLIC_OR_FIXED).accounted_rate == 1.0
    assert SiteSampling().accounted_rate == 1.0
    names = ["a", "b", "c"]
    assert sample_sites(names, SiteSampling(rate=1.0), SeededRandom(0)) == names
    assert sample_sites(names, SiteSampling(rate=0.5), SeededRandom(9)) == sample_sites(
        names, SiteSampling(rate=0.5), SeededRandom(9)
    )


def test_sampling_rejects_bad_input() -> None:
    with pytest.raises(ConfigError) as info:
        SiteSampling(rate=0.0, visibility="sometimes")  # type: ignore[arg-type]
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError) as info:
        sample_sites(["a", "a"], "sampling", None)  # type: ignore[arg-type]
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="non-empty"):
        sample_sites(["a", ""], SiteSampling(), SeededRandom(0))
    with pytest.raises(ConfigError):
        sample_sites("abc", SiteSampling(), SeededRandom(0))  # type: ignore[arg-type]


def test_mode_parsers() -> None:
    assert noise_mode("Central") is NoiseMode.CENTRAL
    assert noise_mode(NoiseMode.DISTRIBUTED) is NoiseMode.DISTRIBUTED
    assert sampling_visibility("hidden_random") is SamplingVisibility.HIDDEN_RANDOM
    with pytest.raises(ConfigError, match="distributed"):
        noise_mode("local")
    with pytest.raises(ConfigError, match="public-or-fixed"):
        sampling_visibility(3)  # type: ignore[arg-type]
