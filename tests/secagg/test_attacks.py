"""Scripted malicious coordinators: honest clients refuse each one, and no input leaks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secagg_helpers import ManualRound
from securefed.errors import ConfigError, ProtocolAbort
from securefed.secagg import ClientState, SecAggConfig, SecAggServer, attacks, secure_sum
from securefed.secagg.messages import RoundSetup, UnmaskRequest
from securefed.secagg.params import minimum_threshold

CONFIGS = {
    "complete-8": (SecAggConfig(), 8),
    "sparse-k4-9": (SecAggConfig(neighbors=4), 9),
    "sparse-k4-11": (SecAggConfig(neighbors=4), 11),
}
SEEDS = [0, 1, 2]
LEAKY_WITHOUT_CHECKS = ["request-both-shares", "substitute-public-key"]


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 6))


def test_attack_catalogue() -> None:
    names = attacks.names()
    assert len(names) == len(set(names)) >= 6
    for name in ("request-both-shares", "substitute-public-key", "inconsistent-survivor-lists",
                 "lower-threshold", "replay-earlier-round", "claim-survivor-dropped"):
        assert name in names
        assert attacks.describe(name)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("setting", list(CONFIGS))
@pytest.mark.parametrize("name", attacks.names())
def test_every_attack_is_refused_and_leaks_nothing(name: str, setting: str, seed: int) -> None:
    config, n = CONFIGS[setting]
    outcome = attacks.run(name, _vectors(n, seed), config, seed=f"{name}-{seed}")
    assert outcome.name == name
    assert outcome.refused, f"{name}: no honest client noticed"
    assert not outcome.leaked and outcome.leaked_sites == ()
    assert not outcome.round_completed
    assert outcome.refusals and all(isinstance(r, str) and r for r in outcome.refusals.values())
    assert all(0 <= site < n for site in outcome.refusals)


@pytest.mark.parametrize("target", [2, 5])
@pytest.mark.parametrize("name", attacks.names())
def test_attacks_on_other_targets(name: str, target: int) -> None:
    outcome = attacks.run(name, _vectors(8, target), SecAggConfig(neighbors=4), seed=f"t{target}", target=target)
    assert outcome.refused and not outcome.leaked


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("setting", ["complete-8", "sparse-k4-9"])
@pytest.mark.parametrize("name", LEAKY_WITHOUT_CHECKS)
def test_without_client_checks_these_attacks_leak_the_target(name: str, setting: str, seed: int) -> None:
    """Shows the leak check works and the client's defences are what stop the attack."""
    config, n = CONFIGS[setting]
    vectors = _vectors(n, seed)
    outcome = attacks.run(name, vectors, config, seed=f"{name}-{seed}", enforce_checks=False)
    assert outcome.leaked
    assert 0 in outcome.leaked_sites
    assert not outcome.refused
    # Same attack, same seed, with the checks on: refused, nothing leaked.
    defended = attacks.run(name, vectors, config, seed=f"{name}-{seed}")
    assert defended.refused and not defended.leaked


def test_refusal_reasons_describe_the_deviation() -> None:
    vectors = _vectors(8, 4)
    expectations = {
        "request-both-shares": "both shares",
        "substitute-public-key": "not signed",
        "lower-threshold": "different round configuration",
        "claim-survivor-dropped": "omits this site",
    }
    for name, phrase in expectations.items():
        outcome = attacks.run(name, vectors, seed="why")
        assert any(phrase in reason for reason in outcome.refusals.values()), (name, outcome.refusals)


def test_unknown_attack_name() -> None:
    with pytest.raises(ConfigError) as info:
        attacks.run("steal-everything", _vectors(4, 0))
    assert "steal-everything" in str(info.value)
    assert "request-both-shares" in str(info.value)  # lists the valid names
    with pytest.raises(ConfigError):
        attacks.describe("steal-everything")


def test_attack_target_out_of_range() -> None:
    with pytest.raises(ConfigError):
        attacks.run("request-both-shares", _vectors(4, 0), target=4)


# ------------------------------------------------------------------------------- low thresholds
@pytest.mark.parametrize("neighbors, n", [(None, 8), (4, 9)])
def test_client_refuses_round_with_threshold_below_minimum(neighbors, n: int) -> None:
    rnd = ManualRound(n=n, seed=f"low-{neighbors}", config=SecAggConfig(neighbors=neighbors))
    m = rnd.round_config.neighbourhood_size
    low = dataclasses.replace(rnd.round_config, threshold=minimum_threshold(m) - 1)
    assert low.digest != rnd.round_config.digest
    client = rnd.fresh_client(0)
    with pytest.raises(ProtocolAbort) as info:
        client.handle(RoundSetup.for_config(low))
    text = str(info.value)
    assert "threshold" in text and f"minimum {minimum_threshold(m)}" in text
    assert client.state is ClientState.ABORTED
    # The coordinator side refuses to run it too.
    with pytest.raises(ProtocolAbort):
        SecAggServer(low, rnd.roster)
    # Control: the same client accepts the original configuration.
    assert rnd.fresh_client(0).handle(RoundSetup.for_config(rnd.round_config)).sender == 0


def test_client_refuses_threshold_above_neighbourhood() -> None:
    rnd = ManualRound(n=6, seed="high")
    high = dataclasses.replace(rnd.round_config, threshold=7)
    with pytest.raises(ProtocolAbort) as info:
        rnd.fresh_client(0).handle(RoundSetup.for_config(high))
    assert "threshold 7" in str(info.value)


@pytest.mark.parametrize("neighbors, n, minimum", [(None, 8, 5), (None, 5, 3), (4, 9, 3), (6, 12, 4)])
def test_secure_sum_refuses_threshold_below_minimum(neighbors, n: int, minimum: int) -> None:
    for low in range(2, minimum):
        with pytest.raises(ConfigError) as info:
            secure_sum(_vectors(n, 0), SecAggConfig(neighbors=neighbors, threshold=low), seed=0, workers=1)
        assert f"minimum {minimum}" in str(info.value)
        assert any(f"threshold {low}" in p for p in info.value.problems)
    # At the minimum it runs, and the sum is right.
    vectors = _vectors(n, 1)
    result = secure_sum(vectors, SecAggConfig(neighbors=neighbors, threshold=minimum), seed=0, workers=1)
    assert result.config.threshold == minimum
    assert np.abs(result.total - vectors.sum(axis=0)).max() <= n / result.config.scale


# --------------------------------------------------------------- defences added after review
@pytest.mark.parametrize("n, k", [(12, 4), (20, 4), (40, 8)])
def test_isolating_a_site_in_a_sparse_graph_needs_the_certificate_rules(n: int, k: int) -> None:
    """The coordinator lets the target mask against only t-1 neighbours and declares them dropped
    to everyone else. Trusting clients leak the target's input; real clients refuse."""
    vectors = _vectors(n, 7)
    naive = attacks.run("isolate-in-sparse-graph", vectors, SecAggConfig(neighbors=k), seed=5, enforce_checks=False)
    assert naive.leaked and naive.leaked_sites == (0,)
    real = attacks.run("isolate-in-sparse-graph", vectors, SecAggConfig(neighbors=k), seed=5)
    assert real.refused and not real.leaked


def test_a_rerun_of_the_same_round_id_is_refused() -> None:
    """Signatures from an aborted run cannot be replayed into a re-run: a site that started round
    r refuses any later setup for round r."""
    rnd = ManualRound(n=5, seed="rerun")
    setup = RoundSetup.for_config(rnd.round_config)
    client = rnd.fresh_client(0, previous_round=rnd.round_config.round_id)  # it started round r before
    with pytest.raises(ProtocolAbort, match="not newer"):
        client.handle(setup)


@pytest.mark.parametrize(
    "change", [{"threshold": 6}, {"neighbors": 2, "threshold": 2}, {"bit_width": 64}]
)
def test_client_with_a_policy_refuses_a_weaker_round(change: dict) -> None:
    rnd = ManualRound(n=10, seed="policy")
    policy = SecAggConfig(neighbors=None, corrupt_fraction=0.2)  # complete graph, t = 7 for 10 sites
    weaker = dataclasses.replace(rnd.round_config, **change)
    client = rnd.fresh_client(0, policy=policy)
    with pytest.raises(ProtocolAbort, match="agreed|differs"):
        client.handle(RoundSetup.for_config(weaker))


def test_a_signer_relayed_twice_counts_once() -> None:
    rnd = ManualRound(n=6, seed="dup-signer")
    rnd.run()
    client = rnd.client_in_state(0, ClientState.CONFIRMED)
    request = rnd.server_message(UnmaskRequest, 0)
    # Neighbours' confirmations are relayed as MAC tags; repeat one of them.
    assert request.confirmations, "in a complete graph every signer is a neighbour"
    first = request.confirmations[0]
    tampered = dataclasses.replace(request, confirmations=(first,) * len(request.confirmations))
    with pytest.raises(ProtocolAbort, match="relayed twice"):
        client.handle(tampered)
    again = rnd.client_in_state(0, ClientState.CONFIRMED)
    signer, _ = first
    both = dataclasses.replace(request, signatures=((signer, b"\0" * 64),))
    with pytest.raises(ProtocolAbort, match="relayed twice"):
        again.handle(both)


def test_the_abort_reason_does_not_reveal_the_weight() -> None:
    rnd = ManualRound(n=4, seed="weight")
    client = rnd.fresh_client(0, weight=7.123456789)
    with pytest.raises(ProtocolAbort) as excinfo:
        client.handle(RoundSetup.for_config(rnd.round_config))
    assert "7.12" not in str(excinfo.value)


@pytest.mark.parametrize("n, neighbors", [(12, 4), (30, 4)])
def test_rerunning_a_round_is_stopped_by_persisted_round_ids(n: int, neighbors: int) -> None:
    """Every other check on, but sites that forget which round ids they started can be made to
    sign two lists for one round; the coordinator then certifies both and isolates the target.
    Persisting the round id (the default harness) stops it at setup."""
    vectors = np.random.default_rng(7).uniform(-1, 1, size=(n, 5))
    forgetful = attacks.run("rerun-same-round", vectors, SecAggConfig(neighbors=neighbors), seed=3, persist_rounds=False)
    assert forgetful.leaked and not forgetful.refused
    persisted = attacks.run("rerun-same-round", vectors, SecAggConfig(neighbors=neighbors), seed=3)
    assert persisted.refused and not persisted.leaked
    assert all("not newer" in reason for reason in persisted.refusals.values())
