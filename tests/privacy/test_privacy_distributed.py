"""The randomized Hadamard rotation and the distributed discrete Gaussian, end to end in numpy."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.linalg import hadamard

from securefed.errors import ConfigError, PrivacyError
from securefed.primitives.randomness import SeededRandom, uniform_floats
from securefed.privacy.distributed import (
    DistributedDPConfig,
    DistributedDPEncoder,
    conditional_round,
    rounded_l2_bound,
)
from securefed.privacy.accounting import AccountantKind, compose_delta, compose_epsilon
from securefed.privacy.discrete_gaussian import fast_sampler_tv_bound
from securefed.privacy.events import DistributedDiscreteGaussian, PrivacyUnit, event_from_record
from securefed.privacy.ledger_compose import SpendComposer
from securefed.privacy.ledger_settle import settle_rule_violation
from securefed.privacy.rdp import DEFAULT_ORDERS, delta_from_rdp, event_rdp
from securefed.privacy.rotation import RandomRotation, Rotation, walsh_hadamard

ROUND = b"round-7"


# ---------------------------------------------------------------------------------------------
# Rotation


@pytest.mark.parametrize("dimension", [1, 3, 8, 1000, 4096])
def test_rotation_is_orthogonal_and_exactly_invertible(dimension: int) -> None:
    rotation = RandomRotation.for_round(dimension=dimension, round_seed=b"seed")
    x = np.random.default_rng(dimension).normal(size=dimension)
    y = rotation.rotate(x)
    assert y.shape == (rotation.padded_dimension,)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-13)
    assert np.max(np.abs(rotation.unrotate(y) - x)) < 1e-12 * max(1.0, np.linalg.norm(x))
    padded = np.random.default_rng(7).normal(size=rotation.padded_dimension)
    assert np.max(np.abs(rotation.rotate(rotation.invert(padded)) - padded)) < 1e-12 * np.linalg.norm(padded)


def test_rotation_is_the_randomized_hadamard_matrix() -> None:
    rotation = RandomRotation.for_round(dimension=6, round_seed=b"matrix")
    matrix = hadamard(8) @ np.diag(rotation.signs) / math.sqrt(8)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(8), atol=1e-15)
    x = np.arange(1.0, 7.0)
    np.testing.assert_allclose(rotation.rotate(x), matrix @ np.concatenate([x, [0.0, 0.0]]), atol=1e-13)
    v = np.random.default_rng(0).normal(size=64)
    np.testing.assert_allclose(walsh_hadamard(v), hadamard(64) @ v, atol=1e-12)


def test_rotation_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    a = RandomRotation.for_round(dimension=500, round_seed=b"a")
    assert np.array_equal(a.signs, RandomRotation.for_round(dimension=500, round_seed=b"a").signs)
    b = RandomRotation.for_round(dimension=500, round_seed=b"b")
    assert np.count_nonzero(a.signs != b.signs) > 100
    x = np.ones(500)
    assert not np.allclose(a.rotate(x), b.rotate(x))
    assert a.kind is Rotation.HADAMARD


def test_rotation_flattens_a_spike() -> None:
    # All mass in one coordinate ends up spread evenly: every entry is +-1/sqrt(d).
    rotation = RandomRotation.for_round(dimension=1024, round_seed=b"spike")
    spike = np.zeros(1024)
    spike[3] = 1.0
    np.testing.assert_allclose(np.abs(rotation.rotate(spike)), 1 / 32, rtol=1e-12)


def test_rotation_rejects_bad_input() -> None:
    rotation = RandomRotation.for_round(dimension=10, round_seed=b"x")
    with pytest.raises(ConfigError):
        rotation.rotate(np.ones(11))
    with pytest.raises(ConfigError):
        rotation.invert(np.ones(10))
    with pytest.raises(ConfigError):
        RandomRotation.for_round(dimension=10, round_seed=b"")
    with pytest.raises(ConfigError):
        RandomRotation.for_round(dimension=0, round_seed=b"x")
    with pytest.raises(ConfigError):
        RandomRotation.for_round(dimension=4, round_seed=b"x", kind="dft")
    with pytest.raises(ConfigError):
        walsh_hadamard(np.ones(6))


# ---------------------------------------------------------------------------------------------
# Conditional rounding


def test_conditional_rounding_never_exceeds_the_bound() -> None:
    d = 256
    x = np.full(d, 10.5)
    x[::2] = -7.5  # every fractional part is 1/2: the most rounding variance possible
    norm = float(np.linalg.norm(x))
    # beta close to 1 makes the bound tight: E|round(x)|^2 = |x|^2 + d/4 sits just below it.
    bound = rounded_l2_bound(l2_norm=norm, dimension=d, beta=0.99)
    exact_bound_sq = bound**2
    rng = SeededRandom("rounding")
    plain_exceeded = 0
    for _ in range(300):
        rounded = conditional_round(x, l2_bound=bound, rng=rng)
        assert rounded.dtype == np.int64
        assert np.all(np.abs(rounded - x) < 1)
        assert sum(int(v) ** 2 for v in rounded) <= exact_bound_sq
        plain = np.floor(x) + (uniform_floats(rng, d) < x - np.floor(x))
        plain_exceeded += float(np.sum(plain**2)) > exact_bound_sq
    # The check is not vacuous: unconditional rounding breaks the bound a good part of the time.
    assert plain_exceeded > 60


def test_rounded_l2_bound_is_the_papers_formula() -> None:
    for norm, d, beta in [(100.0, 64, math.exp(-0.5)), (3.0, 10**6, 0.01), (0.0, 5, 0.5)]:
        probable = norm**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(d) / 2)
        certain = (norm + math.sqrt(d)) ** 2
        assert rounded_l2_bound(l2_norm=norm, dimension=d, beta=beta) == pytest.approx(
            math.sqrt(min(probable, certain)), rel=1e-14
        )
    with pytest.raises(ConfigError) as info:
        rounded_l2_bound(l2_norm=-1.0, dimension=0, beta=1.0)
    assert len(info.value.problems) == 3


def test_conditional_rounding_gives_up_on_an_impossible_bound() -> None:
    with pytest.raises(PrivacyError, match="clip"):
        conditional_round(np.full(16, 3.5), l2_bound=1.0, rng=SeededRandom(0), max_attempts=20)


# ---------------------------------------------------------------------------------------------
# The mechanism, end to end


def _config(**overrides: object) -> DistributedDPConfig:
    params: dict[str, object] = {"l2_clip": 1.0, "noise_multiplier": 1.0, "expected_sites": 5, "min_sites": 3}
    params.update(overrides)
    return DistributedDPConfig(**params)  # type: ignore[arg-type]


def _updates(n: int, dimension: int, seed: int = 0) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    # Norms from 0.2 to 20: some sites are clipped, some are not.
    return [gen.normal(size=dimension) * scale / math.sqrt(dimension) for scale in np.geomspace(0.2, 20, n)]


def _clipped(update: np.ndarray, clip: float) -> np.ndarray:
    return update * min(1.0, clip / float(np.linalg.norm(update)))


def _secure_sum(encoder: DistributedDPEncoder, updates: list[np.ndarray], seed: str = "sites") -> np.ndarray:
    root = SeededRandom(seed)
    encodings = [encoder.encode(u, round_seed=ROUND, rng=root.fork(f"site-{i}")) for i, u in enumerate(updates)]
    for e in encodings:
        assert e.dtype == encoder.dtype and e.shape == (encoder.padded_dimension,)
    # What secure aggregation computes: the sum modulo 2**b (numpy's unsigned arithmetic wraps).
    return np.sum(np.stack(encodings), axis=0, dtype=encoder.dtype)


def _variance_within(errors: np.ndarray, variance: float) -> bool:
    # Mean square about the known mean 0; relative standard error sqrt(2/n) for Gaussian errors.
    estimate = float(np.mean(errors**2))
    return abs(estimate / variance - 1) < 5 * math.sqrt(2 / errors.size)


def test_decoded_sum_is_within_the_bound_and_carries_the_accounted_noise() -> None:
    config = _config()
    encoder = DistributedDPEncoder(config, dimension=16384)
    updates = _updates(5, 16384)
    decoded = encoder.decode(_secure_sum(encoder, updates), round_seed=ROUND)
    truth = sum(_clipped(u, 1.0) for u in updates)
    errors = decoded - truth
    assert decoded.dtype == np.float64 and decoded.shape == (16384,)
    assert np.linalg.norm(errors) <= encoder.error_bound(sites=5)
    # Accounted: min_sites = 3 sites reach std z c, so 5 sites carry variance 5 (z c)^2 / 3.
    accounted = 5 * (config.noise_multiplier * config.l2_clip) ** 2 / config.min_sites
    assert encoder.sum_noise_std(sites=5) ** 2 == pytest.approx(accounted, rel=1e-12)
    assert _variance_within(errors, accounted)
    # The bound is not vacuous: the error is a good fraction of it.
    assert np.linalg.norm(errors) > 0.5 * encoder.error_bound(sites=5)


def test_decoded_sum_recovers_the_signal_when_the_noise_is_small() -> None:
    encoder = DistributedDPEncoder(_config(noise_multiplier=0.002), dimension=1000)
    updates = _updates(5, 1000, seed=5)
    truth = sum(_clipped(u, 1.0) for u in updates)
    decoded = encoder.decode(_secure_sum(encoder, updates, seed="snr"), round_seed=ROUND)
    assert np.linalg.norm(decoded - truth) <= encoder.error_bound(sites=5) < 0.25 * np.linalg.norm(truth)


def test_fewer_survivors_mean_less_noise_and_a_larger_epsilon() -> None:
    config = _config()
    encoder = DistributedDPEncoder(config, dimension=16384)
    updates = _updates(5, 16384, seed=1)[:3]
    decoded = encoder.decode(_secure_sum(encoder, updates, seed="survivors"), round_seed=ROUND)
    errors = decoded - sum(_clipped(u, 1.0) for u in updates)
    assert np.linalg.norm(errors) <= encoder.error_bound(sites=3)
    # Three survivors: exactly the target variance (z c)^2, 3/5 of the five-site variance.
    assert _variance_within(errors, 1.0)
    assert not _variance_within(errors, 5 / 3)
    for order in (1.5, 2.0, 8.0, 32.0):
        assert encoder.event(sites=3).rdp(order) > encoder.event(sites=5).rdp(order)
        # min_sites sites give (almost exactly) the Gaussian mechanism's RDP order / (2 z^2).
        assert encoder.event(sites=3).rdp(order) == pytest.approx(order / 2, rel=1e-3)


def test_event_and_sensitivities_follow_the_paper() -> None:
    config = _config(beta=0.1)
    encoder = DistributedDPEncoder(config, dimension=3000)
    d = 4096
    assert encoder.padded_dimension == d
    scaled = config.l2_clip / encoder.gamma
    probable = scaled**2 + d / 4 + math.sqrt(2 * math.log(10)) * (scaled + math.sqrt(d) / 2)
    l2 = math.sqrt(min(probable, (scaled + math.sqrt(d)) ** 2))
    assert encoder.l2_sensitivity == pytest.approx(l2, rel=1e-12)
    assert encoder.l1_sensitivity == pytest.approx(max(l2, min(l2**2, math.sqrt(d) * l2)), rel=1e-9)
    assert encoder.site_sigma**2 == pytest.approx(scaled**2 / config.min_sites, rel=1e-12)
    event = encoder.event(sites=4, steps=7)
    assert (event.sites, event.steps, event.dimension, event.unit) == (4, 7, d, PrivacyUnit.SITE)
    assert event.site_sigma == encoder.site_sigma and event.l2_sensitivity == encoder.l2_sensitivity


def test_gamma_is_the_finest_grid_with_head_room() -> None:
    config = _config(expected_sites=20, min_sites=10, noise_multiplier=0.7, l2_clip=3.0)
    encoder = DistributedDPEncoder(config, dimension=1000)
    n, m, d, c, z, k = 20, 10, 1024, 3.0, 0.7, 4.0

    def stddevs_of_room(gamma: float) -> float:
        sigma_sq = (z * c / gamma) ** 2 / m
        proxy = (n * c / gamma) ** 2 / d + n / 4 + n * sigma_sq
        return (2**31 - 1) / math.sqrt(proxy)

    assert stddevs_of_room(encoder.gamma) >= k * (1 - 1e-12)
    assert stddevs_of_room(encoder.gamma * 0.99) < k


def test_too_many_sites_for_32_bits_is_refused_and_64_bits_accepts() -> None:
    many = {"expected_sites": 10**6, "min_sites": 10**6}
    with pytest.raises(ConfigError, match="bit_width"):
        DistributedDPEncoder(_config(**many), dimension=16)
    wide = DistributedDPEncoder(_config(bit_width=64, **many), dimension=16)
    assert wide.dtype is np.uint64 and wide.site_sigma > 1e6


def test_64_bit_round_trip() -> None:
    encoder = DistributedDPEncoder(_config(bit_width=64, expected_sites=3, min_sites=2), dimension=700)
    updates = _updates(3, 700, seed=4)
    total = _secure_sum(encoder, updates, seed="wide")
    assert total.dtype == np.uint64
    errors = encoder.decode(total, round_seed=ROUND) - sum(_clipped(u, 1.0) for u in updates)
    assert np.linalg.norm(errors) <= encoder.error_bound(sites=3)
    assert _variance_within(errors, 3 / 2)


def test_decoding_is_exact_across_the_whole_signed_range() -> None:
    encoder = DistributedDPEncoder(_config(), dimension=8)
    signed = np.array([2**31 - 1, -(2**31), -1, 0, 1, 12345, -99999, 2**30], dtype=np.int64)
    ring = (signed % 2**32).astype(np.uint32)
    expected = RandomRotation.for_round(dimension=8, round_seed=ROUND).unrotate(signed * encoder.gamma)
    np.testing.assert_allclose(encoder.decode(ring, round_seed=ROUND), expected, rtol=1e-15, atol=0)


def test_too_little_head_room_wraps_and_ruins_the_sum() -> None:
    # Identical updates add up coherently; with k_stddevs = 0.5 many rotated coordinates of the
    # sum leave the 32-bit range and wrap: the documented failure mode the head-room prevents.
    update = _updates(1, 1000, seed=3)[0] * 100
    truth = 4 * _clipped(update, 1.0)
    for k, wraps in ((4.0, False), (0.5, True)):
        encoder = DistributedDPEncoder(_config(noise_multiplier=0.05, expected_sites=4, k_stddevs=k), dimension=1000)
        decoded = encoder.decode(_secure_sum(encoder, [update] * 4, seed=f"wrap-{k}"), round_seed=ROUND)
        within = np.linalg.norm(decoded - truth) <= encoder.error_bound(sites=4)
        assert within is not wraps


def test_encoder_rejects_bad_input() -> None:
    encoder = DistributedDPEncoder(_config(), dimension=10)
    rng = SeededRandom(0)
    bad = np.ones(10)
    bad[4] = np.nan
    with pytest.raises(ConfigError, match="index 4"):
        encoder.encode(bad, round_seed=ROUND, rng=rng)
    with pytest.raises(ConfigError, match="length 9"):
        encoder.encode(np.ones(9), round_seed=ROUND, rng=rng)
    with pytest.raises(ConfigError, match="1-D"):
        encoder.encode(np.ones((2, 5)), round_seed=ROUND, rng=rng)
    with pytest.raises(ConfigError):
        encoder.encode(np.ones(10), round_seed=b"", rng=rng)
    with pytest.raises(ConfigError):
        encoder.encode(np.ones(10), round_seed=ROUND, rng=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="uint32"):
        encoder.decode(np.zeros(16, dtype=np.int64), round_seed=ROUND)
    with pytest.raises(ConfigError, match="shape"):
        encoder.decode(np.zeros(10, dtype=np.uint32), round_seed=ROUND)
    for sites in (0, 6, True, 2.0):
        with pytest.raises(ConfigError):
            encoder.event(sites=sites)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DistributedDPEncoder(_config(), dimension=0)


def test_config_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        DistributedDPConfig()
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4
    for name in ("set l2_clip", "set noise_multiplier", "set expected_sites", "set min_sites"):
        assert name in text
    with pytest.raises(ConfigError) as info:
        DistributedDPConfig(l2_clip=-1.0, noise_multiplier=float("inf"), expected_sites=2, min_sites=3,
                            bit_width=16, beta=1.0, k_stddevs=0, rotation="dft")  # type: ignore[arg-type]
    assert len(info.value.problems) == 7
    assert _config(rotation="hadamard").rotation is Rotation.HADAMARD


# ---------------------------------------------------------------------------------------------
# The sampler's slack, and what an event may claim


def _big_event(**changes: object) -> DistributedDiscreteGaussian:
    # A million padded coordinates, 10 sites, 100 rounds: H = 1e9 * sampler_tv.
    params: dict[str, object] = dict(l2_sensitivity=1100.0, l1_sensitivity=1100.0**2, site_sigma=1e4, sites=10,
                                     dimension=2**20, steps=100, sampler_tv=1e-14)
    params.update(changes)
    return DistributedDiscreteGaussian(**params)  # type: ignore[arg-type]


def test_encoder_events_carry_the_fast_samplers_slack_and_consistent_sensitivities() -> None:
    encoder = DistributedDPEncoder(_config(beta=0.1), dimension=3000)
    event = encoder.event(sites=4)
    assert event.sampler_tv == fast_sampler_tv_bound(encoder.site_sigma) > 0
    l2, d = event.l2_sensitivity, event.dimension
    assert l2 <= event.l1_sensitivity and min(l2 * l2, math.sqrt(d) * l2) <= event.l1_sensitivity
    assert event_from_record(event.to_record()) == event


def test_the_slack_is_charged_on_top_of_the_renyi_bound() -> None:
    slack_free = _big_event(sampler_tv=0.0)
    event = _big_event()
    slack = 10 * 2**20 * 100 * 1e-14
    delta = 1e-4
    free = compose_epsilon([slack_free], delta=delta)
    charged = compose_epsilon([event], delta=delta)
    assert charged > free
    # delta(eps) is the Renyi delta plus (1 + e^eps) H, computed independently here.
    for eps in (0.5, charged, 3.0):
        renyi = delta_from_rdp(DEFAULT_ORDERS, event_rdp(slack_free, DEFAULT_ORDERS), epsilon=eps)
        assert compose_delta([event], epsilon=eps) == pytest.approx(renyi + (1 + math.exp(eps)) * slack, rel=1e-12)
    # The reported epsilon fits in delta, and is (nearly) the least that does.
    assert compose_delta([event], epsilon=charged) <= delta
    assert compose_delta([event], epsilon=charged * (1 - 1e-6)) > delta
    # The ledger's running composition charges it too.
    composer = SpendComposer(accountant=AccountantKind.RDP, delta=delta)
    composer.charge(1, event)
    assert composer.epsilon() == charged


def test_a_slack_that_fills_delta_is_refused() -> None:
    with pytest.raises(PrivacyError, match="slack"):
        compose_epsilon([_big_event(sampler_tv=5e-13)], delta=1e-3)  # 2H = 1e-3: no room at all
    with pytest.raises(PrivacyError, match="slack"):
        compose_epsilon([_big_event(sampler_tv=4e-14)], delta=1e-4)  # room only where eps < 0.33


def test_slack_and_sensitivity_fields_are_validated_and_recorded() -> None:
    plain = _big_event(sampler_tv=0.0)
    assert "sampler_tv" not in plain.to_record()  # older records keep their form
    assert event_from_record(plain.to_record()) == plain
    assert event_from_record(_big_event().to_record()).sampler_tv == 1e-14
    for bad in (-1e-15, 1e-6, float("nan"), "0"):
        with pytest.raises(ConfigError, match="sampler_tv"):
            _big_event(sampler_tv=bad)
    with pytest.raises(ConfigError, match="below l2_sensitivity"):
        _big_event(l1_sensitivity=1000.0)
    # L1 derivable from L2 = 1100 over 2^20 coordinates: min(1100^2, 1024 * 1100).
    with pytest.raises(ConfigError, match="min"):
        _big_event(l1_sensitivity=1024 * 1100.0 - 1)
    assert _big_event(l1_sensitivity=1024 * 1100.0).l1_sensitivity == 1024 * 1100.0


def test_a_settle_may_not_change_the_slack() -> None:
    charged = _big_event(cohort=12)
    assert settle_rule_violation(charged, dataclasses.replace(charged, sites=12)) is None
    violation = settle_rule_violation(charged, dataclasses.replace(charged, sites=12, sampler_tv=0.0))
    assert violation is not None and "sampler_tv" in violation
