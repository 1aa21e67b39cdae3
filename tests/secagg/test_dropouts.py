"""Sites vanishing at any stage: the round completes with exactly the right sum, or aborts cleanly."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest

from secagg_helpers import STAGES, federation
from securefed.errors import ConfigError, ProtocolAbort
from securefed.primitives.randomness import SeededRandom
from securefed.secagg import SecAggConfig, Stage, secure_sum
from securefed.secagg.attacks import _Knowledge, _recover_inputs
from securefed.secagg.client import SecAggClient
from securefed.secagg.graph import NeighbourGraph
from securefed.secagg.messages import UnmaskShares, decode_message
from securefed.secagg.recipes import _Simulation
from securefed.secagg.server import SecAggServer

LENGTH = 5


def _vanish_stage(dropouts: dict[str, list[int]]) -> dict[int, Stage]:
    """The first stage each site vanishes at (computed by the test, not the library)."""
    first: dict[int, Stage] = {}
    for name, sites in dropouts.items():
        stage = Stage(name)
        for s in sites:
            if s not in first or STAGES.index(stage) < STAGES.index(first[s]):
                first[s] = stage
    return first


def _alive(n: int, vanish: dict[int, Stage], stage: Stage) -> set[int]:
    """Sites still answering at ``stage``: not vanished at that stage or an earlier one."""
    k = STAGES.index(stage)
    return {s for s in range(n) if s not in vanish or STAGES.index(vanish[s]) > k}


def _complete_graph_expectation(n: int, t: int, vanish: dict[int, Stage]) -> tuple[bool, Stage | None]:
    for stage in STAGES:
        if len(_alive(n, vanish, stage)) < t:
            return False, stage
    return True, None


def _sparse_expectation(config, vanish: dict[int, Stage]) -> tuple[bool, set[int]]:
    """Whether a round on the sparse graph can complete, and whose inputs its sum holds, from the
    protocol's rules as documented: every site needs ``threshold`` live members in its
    neighbourhood to share, mask, confirm and have its masks removed. A live site whose
    neighbourhood falls below that is left out of the round (so it is not a survivor)."""
    n, t = config.n_sites, config.threshold
    graph = NeighbourGraph(config.participants, config.neighbors, config.graph_seed)
    nbhd = graph.neighbourhood

    def viable(group: set[int]) -> set[int]:
        group = set(group)
        while True:
            weak = {s for s in group if len(nbhd(s) & group) < t}
            if not weak:
                return group
            group -= weak

    alive = {stage: _alive(n, vanish, stage) for stage in STAGES}
    u1 = viable(alive[Stage.ADVERTISE_KEYS])
    if len(u1) < t:
        return False, set()
    u2 = viable(u1 & alive[Stage.SHARE_KEYS])
    if len(u2) < t:
        return False, set()
    u3 = u2 & alive[Stage.MASKED_INPUT]
    if len(u3) < t:
        return False, set()
    confirming = u3 & alive[Stage.CONSISTENCY_CHECK]
    if any(len(nbhd(s) & u3) < t for s in confirming):
        return False, set()  # a live survivor sees too few surviving neighbours and refuses to go on
    u4 = {s for s in confirming if len(nbhd(s) & confirming) >= t}
    if len(u4) < t:
        return False, set()
    answering = u4 & alive[Stage.UNMASK]
    dropped = {d for d in u2 - u3 if nbhd(d) & u3}
    return all(len(nbhd(s) & answering) >= t for s in u3 | dropped), u3


def _random_schedule(rng: random.Random, n: int) -> dict[str, list[int]]:
    """Each site vanishes at a random stage with some probability; occasionally list a site twice."""
    p = rng.choice([0.1, 0.25, 0.4, 0.55])
    schedule: dict[str, list[int]] = {}
    for site in range(n):
        if rng.random() < p:
            schedule.setdefault(rng.choice(STAGES).value, []).append(site)
    if schedule and rng.random() < 0.15:  # the earliest listing must win
        site = rng.choice([s for sites in schedule.values() for s in sites])
        schedule.setdefault(rng.choice(STAGES).value, []).append(site)
    return schedule


def _check_abort_message(exc: ProtocolAbort, n: int, t: int, stage: Stage, vanish) -> None:
    text = str(exc)
    assert exc.stage == stage.value
    assert text.startswith(f"[{stage.value}]")
    responded = len(_alive(n, vanish, stage))
    if stage is Stage.UNMASK:
        assert f"{responded} sites answered" in text
        assert f"needs {t} shares" in text
    else:
        assert f"{responded} of {n} sites" in text
        assert f"threshold is {t}" in text


def _run_schedules(count: int, neighbors, seed: int, sizes: range) -> dict[str, int]:
    rng = random.Random(seed)
    tally = {"completed": 0, "aborted": 0, "left_out": 0}
    for case in range(count):
        n = rng.choice(sizes)
        vectors = np.random.default_rng(seed * 1000 + case).uniform(-1, 1, size=(n, LENGTH))
        schedule = _random_schedule(rng, n)
        vanish = _vanish_stage(schedule)
        config = SecAggConfig(neighbors=neighbors)
        label = f"case {case}: n={n}, schedule={schedule}"
        try:
            result = secure_sum(vectors, config, dropouts=schedule, seed=f"drop-{seed}-{case}", workers=1)
        except ProtocolAbort as exc:
            outcome, error = None, exc
        else:
            outcome, error = result, None
        # Recompute the round's configuration to know t and the graph (same seed, same inputs).
        round_config = _round_config(vectors, config, f"drop-{seed}-{case}")
        t = round_config.threshold
        sent_input = _alive(n, vanish, Stage.MASKED_INPUT)
        if round_config.neighbors is None:
            expect_ok, abort_stage = _complete_graph_expectation(n, t, vanish)
            counted = sent_input
        else:
            (expect_ok, counted), abort_stage = _sparse_expectation(round_config, vanish), None
        if expect_ok:
            assert error is None, f"{label}: expected completion, got {error}"
        else:
            assert error is not None, f"{label}: expected an abort, the round completed"
        if error is not None:
            tally["aborted"] += 1
            assert any(f"[{s.value}]" in str(error) for s in STAGES), f"{label}: abort names no stage: {error}"
            if abort_stage is not None:
                _check_abort_message(error, n, t, abort_stage, vanish)
            continue
        tally["completed"] += 1
        assert outcome.survivors == counted, label
        assert counted <= sent_input
        tally["left_out"] += counted != sent_input
        expected = vectors[sorted(counted)].sum(axis=0)
        assert np.abs(outcome.total - expected).max() <= n / outcome.config.scale + 1e-12, label
        assert abs(outcome.total_weight - len(counted)) <= n / outcome.config.weight_codec().scale + 1e-12
    return tally


def _round_config(vectors, config, seed):
    rng = SeededRandom(seed)
    _, roster = _simulated_roster(len(vectors), rng)
    return config.round_config(
        n_sites=len(vectors), vector_length=vectors.shape[1], round_id=1, roster_digest=roster.digest(),
        graph_seed=rng.fork("graph-seed").random_bytes(32),
    )


def _simulated_roster(n, rng):
    from securefed.secagg.recipes import simulated_federation

    return simulated_federation(n, rng.fork("identities"))


def test_round_config_recomputation_matches_secure_sum() -> None:
    """The helper above must describe exactly the round secure_sum ran (else the oracle is moot)."""
    vectors = np.random.default_rng(0).uniform(-1, 1, (9, LENGTH))
    result = secure_sum(vectors, SecAggConfig(neighbors=4), seed="same", workers=1)
    assert _round_config(vectors, SecAggConfig(neighbors=4), "same") == result.config


@pytest.mark.slow
def test_random_dropout_schedules_complete_graph() -> None:
    tally = _run_schedules(200, None, seed=1, sizes=range(5, 11))
    assert tally["completed"] >= 30 and tally["aborted"] >= 30, tally


@pytest.mark.slow
def test_random_dropout_schedules_sparse_graph() -> None:
    tally = _run_schedules(100, 4, seed=2, sizes=range(7, 11))
    assert tally["completed"] >= 15 and tally["aborted"] >= 15, tally


def test_site_cut_off_from_its_neighbourhood_is_left_out() -> None:
    """Sparse graph: when most of a live site's neighbours vanish, its masks could not be
    removed, so the round leaves it out and says so in ``survivors``; the sum is still exact."""
    n, length, seed = 10, LENGTH, "cut-off"
    config = SecAggConfig(neighbors=4)
    vectors = np.random.default_rng(9).uniform(-1, 1, (n, length))
    round_config = _round_config(vectors, config, seed)
    graph = NeighbourGraph(round_config.participants, round_config.neighbors, round_config.graph_seed)
    t = round_config.threshold
    exercised = 0
    for site in range(n):
        near = sorted(graph.neighbours(site))
        for gone in itertools.combinations(near, len(near) + 2 - t):
            schedule = {"advertise_keys": list(gone)}
            ok, counted = _sparse_expectation(round_config, _vanish_stage(schedule))
            if not ok or site in counted:
                continue
            result = secure_sum(vectors, config, dropouts=schedule, seed=seed, workers=1)
            assert site not in result.survivors
            assert result.survivors == counted
            assert np.abs(result.total - vectors[sorted(counted)].sum(axis=0)).max() <= n / round_config.scale
            exercised += 1
            break
    assert exercised >= 1


def test_random_dropout_schedules_two_neighbour_ring() -> None:
    tally = _run_schedules(40, 2, seed=3, sizes=range(6, 11))
    assert tally["completed"] >= 3 and tally["aborted"] >= 3, tally


# ----------------------------------------------------------------------------- specific cases
@pytest.mark.parametrize("stage", [s.value for s in Stage])
def test_single_dropout_at_each_stage(stage: str) -> None:
    n = 6
    vectors = np.random.default_rng(4).uniform(-1, 1, (n, LENGTH))
    result = secure_sum(vectors, dropouts={stage: [2]}, seed=f"one-{stage}", workers=1)
    counted = set(range(n)) - ({2} if STAGES.index(Stage(stage)) <= STAGES.index(Stage.MASKED_INPUT) else set())
    assert result.survivors == counted
    expected = vectors[sorted(counted)].sum(axis=0)
    assert np.abs(result.total - expected).max() <= n / result.config.scale
    # The coordinator never got anything from site 2 at or after the stage it vanished.
    late = [m for m in result.coordinator_view.messages if m.sender == 2]
    assert [m.stage for m in late] == STAGES[: STAGES.index(Stage(stage))]


@pytest.mark.parametrize("stage", [s.value for s in Stage])
def test_abort_message_names_stage_and_counts(stage: str) -> None:
    n = 7  # threshold 4: losing four sites is fatal at any stage
    vectors = np.random.default_rng(5).uniform(-1, 1, (n, LENGTH))
    with pytest.raises(ProtocolAbort) as info:
        secure_sum(vectors, dropouts={stage: [0, 3, 5, 6]}, seed=f"abort-{stage}", workers=1)
    _check_abort_message(info.value, n, 4, Stage(stage), _vanish_stage({stage: [0, 3, 5, 6]}))


def test_exactly_threshold_survivors_suffice() -> None:
    n = 7
    vectors = np.random.default_rng(6).uniform(-1, 1, (n, LENGTH))
    schedule = {"share_keys": [1], "masked_input": [4], "unmask": [6]}  # 4 = t answer the unmask
    result = secure_sum(vectors, dropouts=schedule, seed="edge", workers=1)
    assert result.config.threshold == 4
    assert result.survivors == {0, 2, 3, 5, 6}
    assert np.abs(result.total - vectors[[0, 2, 3, 5, 6]].sum(axis=0)).max() <= n / result.config.scale


def test_duplicate_listing_uses_earliest_stage() -> None:
    n = 6
    vectors = np.random.default_rng(7).uniform(-1, 1, (n, LENGTH))
    result = secure_sum(vectors, dropouts={"unmask": [1], "share_keys": [1]}, seed="dup", workers=1)
    assert result.survivors == {0, 2, 3, 4, 5}
    assert all(m.sender != 1 or m.stage is Stage.ADVERTISE_KEYS for m in result.coordinator_view.messages)


def test_stage_enum_keys_are_accepted() -> None:
    vectors = np.random.default_rng(8).uniform(-1, 1, (5, LENGTH))
    a = secure_sum(vectors, dropouts={Stage.MASKED_INPUT: [0]}, seed="enum", workers=1)
    b = secure_sum(vectors, dropouts={"masked_input": [0]}, seed="enum", workers=1)
    np.testing.assert_array_equal(a.total, b.total)
    assert a.survivors == {1, 2, 3, 4}


# ----------------------------------------------------------------------------- privacy on abort
def _build(vectors, config, schedule, seed):
    """A round like secure_sum's, but the test keeps the simulation (and the coordinator's view)."""
    n = len(vectors)
    identities, roster = federation(n, seed)
    round_config = config.round_config(
        n_sites=n, vector_length=vectors.shape[1], round_id=1, roster_digest=roster.digest(),
        graph_seed=SeededRandom(seed).fork("graph").random_bytes(32),
    )
    server = SecAggServer(round_config, roster)
    clients = {
        i: SecAggClient(identity=identities[i], roster=roster, vector=vectors[i], rng=SeededRandom(seed).fork(f"c{i}"), previous_round=None)
        for i in range(n)
    }
    sim = _Simulation(server, clients, vanish=_vanish_stage(schedule), keep_messages=True, workers=1)
    return sim, round_config


def _simulate(vectors, config, schedule, seed):
    sim, round_config = _build(vectors, config, schedule, seed)
    try:
        result = sim.run()
    except ProtocolAbort as exc:
        return sim, round_config, None, exc
    return sim, round_config, result, None


def _revealed(view):
    mask, key = {}, {}
    for m in view.messages:
        message = decode_message(m.data)
        if isinstance(message, UnmaskShares):
            for item in message.self_mask_shares:
                mask.setdefault(item.owner, set()).add(message.sender)
            for item in message.key_shares:
                key.setdefault(item.owner, set()).add(message.sender)
    return mask, key


@pytest.mark.parametrize("neighbors", [None, 4])
def test_coordinator_recovers_no_single_input_after_abort_or_success(neighbors) -> None:
    rng = random.Random(11)
    outcomes = {"aborted": 0, "completed": 0}
    for case in range(40):
        n = rng.choice(range(7, 11))
        vectors = np.random.default_rng(case).uniform(-1, 1, (n, LENGTH))
        schedule = _random_schedule(rng, n)
        sim, config, result, error = _simulate(vectors, SecAggConfig(neighbors=neighbors), schedule, f"leak-{case}")
        outcomes["aborted" if error else "completed"] += 1
        t = config.threshold
        mask, key = _revealed(sim.view)
        for site in range(n):
            both = len(mask.get(site, ())) >= t and len(key.get(site, ())) >= t
            assert not both, f"case {case}: both secrets of site {site} were revealed ({schedule})"
        knowledge = _Knowledge()
        knowledge.masked_with.update(sim.server._delivered)
        recovered = _recover_inputs([m.data for m in sim.view.messages], config, knowledge)
        for site, values in recovered.items():
            assert not np.allclose(values, vectors[site], atol=n / config.scale), f"case {case}: site {site} leaked"
    assert outcomes["aborted"] >= 5 and outcomes["completed"] >= 5, outcomes


def test_leak_check_detects_a_revealed_input() -> None:
    """Control for the test above: hand the checker the key shares of a survivor and it does
    recover that survivor's input, so 'nothing recovered' there is a real finding."""
    n = 5
    vectors = np.random.default_rng(12).uniform(-1, 1, (n, LENGTH))
    sim, config = _build(vectors, SecAggConfig(), {}, "control")
    stolen: dict[int, bytes] = {}

    def intercept(stage, site, message):
        if stage is Stage.UNMASK:  # every holder still has its shares of site 0 here
            stolen[site + 1] = sim.clients[site]._held[0][0]
        return message

    result = sim.run(intercept)
    assert np.abs(result.total - vectors.sum(axis=0)).max() <= n / config.scale
    knowledge = _Knowledge()
    knowledge.masked_with.update(sim.server._delivered)
    messages = [m.data for m in sim.view.messages]
    assert 0 not in {s for s, v in _recover_inputs(messages, config, knowledge).items()
                     if np.allclose(v, vectors[s], atol=n / config.scale)}
    knowledge.extra_shares["key"][0] = stolen
    recovered = _recover_inputs(messages, config, knowledge)
    assert 0 in recovered
    np.testing.assert_allclose(recovered[0], vectors[0], atol=2 / config.scale)


# ----------------------------------------------------------------------------- bad dropouts
def test_dropout_site_indices_are_checked() -> None:
    vectors = np.zeros((4, LENGTH))
    with pytest.raises(ConfigError) as info:
        secure_sum(vectors, dropouts={"share_keys": [4], "unmask": [-1]}, seed=0, workers=1)
    assert len(info.value.problems) == 2
    assert re.search(r"sites are 0\.\.3", str(info.value))
