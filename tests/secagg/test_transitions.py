"""Both state machines move one stage at a time and refuse anything out of order."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from secagg_helpers import (
    CLIENT_TYPES,
    EXPECTED_BY_STATE,
    SERVER_TYPES,
    STAGES,
    ManualRound,
    wire,
)
from securefed.errors import ProtocolAbort, UnexpectedMessageError
from securefed.secagg import ClientState, SecAggServer, Stage
from securefed.secagg.server import AggregateResult
from securefed.secagg.stages import ALLOWED_TRANSITIONS, parse_stage

ALL_PAIRS = list(itertools.product([None, *Stage], list(Stage)))
FORBIDDEN = [p for p in ALL_PAIRS if p not in ALLOWED_TRANSITIONS]
ACTIVE_STATES = list(EXPECTED_BY_STATE)  # the states that wait for a coordinator message


@pytest.fixture(scope="module")
def honest() -> ManualRound:
    """One fully recorded honest round (4 sites, complete graph)."""
    rnd = ManualRound(n=4, seed="transitions")
    rnd.run()
    return rnd


# ------------------------------------------------------------------------------- the table
def test_allowed_transitions_are_exactly_the_linear_order() -> None:
    order = [None, *Stage]
    assert ALLOWED_TRANSITIONS == {(order[i], order[i + 1]) for i in range(len(order) - 1)}
    assert [s.value for s in Stage] == [
        "advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask",
    ]
    assert Stage.UNMASK.next() is None
    assert len(FORBIDDEN) == len(ALL_PAIRS) - 5


def test_parse_stage() -> None:
    for stage in Stage:
        assert parse_stage(stage) is stage
        assert parse_stage(stage.value) is stage


# ------------------------------------------------------------------------------- server
@pytest.mark.parametrize("current, target", FORBIDDEN, ids=lambda s: getattr(s, "value", str(s)))
def test_server_refuses_forbidden_transition(honest: ManualRound, current, target) -> None:
    server = SecAggServer(honest.round_config, honest.roster)
    server.stage = current
    with pytest.raises(UnexpectedMessageError) as info:
        server._enter(target)
    assert target.value in str(info.value)
    assert server.stage is current


@pytest.mark.parametrize("current, target", sorted(ALLOWED_TRANSITIONS, key=lambda p: STAGES.index(p[1])),
                         ids=lambda s: getattr(s, "value", str(s)))
def test_server_makes_allowed_transition(honest: ManualRound, current, target) -> None:
    server = SecAggServer(honest.round_config, honest.roster)
    server.stage = current
    server._enter(target)
    assert server.stage is target


def test_server_close_stage_and_receive_before_begin(honest: ManualRound) -> None:
    server = SecAggServer(honest.round_config, honest.roster)
    with pytest.raises(UnexpectedMessageError):
        server.close_stage()
    with pytest.raises(UnexpectedMessageError):
        server.receive(honest.client_message(CLIENT_TYPES[0]))
    assert server.stage is None


def test_server_begin_twice() -> None:
    rnd = ManualRound(n=3, seed="begin-twice")
    rnd.begin()
    with pytest.raises(UnexpectedMessageError):
        rnd.server.begin()
    assert rnd.server.stage is Stage.ADVERTISE_KEYS
    rnd.run()


def test_server_refuses_everything_after_finishing(honest: ManualRound) -> None:
    server = honest.server
    assert server.finished and isinstance(honest.result, AggregateResult)
    for cls in CLIENT_TYPES:
        with pytest.raises(UnexpectedMessageError):
            server.receive(honest.client_message(cls))
    with pytest.raises(UnexpectedMessageError):
        server.close_stage()
    with pytest.raises(UnexpectedMessageError):
        server.begin()


def test_server_refuses_wrong_stage_messages_and_still_computes_the_sum(honest: ManualRound) -> None:
    """At each stage feed the messages of every other stage (taken from the recorded round):
    each is refused, nothing is counted, and the round still ends with the plain sum."""
    rnd = ManualRound(n=4, seed="transitions")  # same seed: same keys and messages as ``honest``
    rnd.begin()
    while rnd.result is None:
        stage = rnd.server.stage
        replies = rnd.collect()
        for other in CLIENT_TYPES:
            if other.STAGE is stage:
                continue
            for site in range(rnd.n):
                with pytest.raises(UnexpectedMessageError) as info:
                    rnd.server.receive(honest.client_message(other, site))
                assert stage.value in str(info.value)
        for message in replies.values():
            rnd.server.receive(message)
        rnd.close()
    np.testing.assert_array_equal(rnd.result.raw, honest.result.raw)
    assert np.abs(rnd.result.total - rnd.vectors.sum(axis=0)).max() <= rnd.n / rnd.round_config.scale


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.value)
def test_server_refuses_duplicate_messages(stage: Stage) -> None:
    rnd = ManualRound(n=4, seed=f"dup-{stage.value}")
    rnd.begin()
    while rnd.server.stage is not stage:
        rnd.step()
    replies = rnd.collect()
    for message in replies.values():
        rnd.server.receive(message)
    for site, message in replies.items():
        with pytest.raises(UnexpectedMessageError) as info:
            rnd.server.receive(message)
        assert f"site {site}" in str(info.value)
        with pytest.raises(UnexpectedMessageError):
            rnd.server.receive(wire(message))  # a re-encoded copy is no different
    rnd.close()
    result = rnd.run()
    # Nothing was counted twice: the sum is still the plain sum.
    assert np.abs(result.total - rnd.vectors.sum(axis=0)).max() <= rnd.n / rnd.round_config.scale
    assert result.total_weight == pytest.approx(rnd.n, abs=1e-6)


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.value)
def test_server_refuses_messages_from_another_round_or_outsiders(stage: Stage) -> None:
    rnd = ManualRound(n=4, seed=f"other-{stage.value}")
    rnd.begin()
    while rnd.server.stage is not stage:
        rnd.step()
    replies = rnd.collect()
    sample = replies[1]
    with pytest.raises(UnexpectedMessageError):
        rnd.server.receive(dataclasses.replace(sample, round_id=sample.round_id + 1))
    with pytest.raises(UnexpectedMessageError):
        rnd.server.receive(dataclasses.replace(sample, config_digest=bytes(32)))
    with pytest.raises(UnexpectedMessageError):
        rnd.server.receive(dataclasses.replace(sample, sender=rnd.n + 3))  # not a participant
    for message in replies.values():
        rnd.server.receive(message)
    rnd.close()
    result = rnd.run()
    assert np.abs(result.total - rnd.vectors.sum(axis=0)).max() <= rnd.n / rnd.round_config.scale


def test_server_refuses_a_site_that_dropped_earlier() -> None:
    rnd = ManualRound(n=5, seed="late")
    rnd.begin()
    replies = rnd.collect()
    for site, message in replies.items():
        if site != 3:
            rnd.server.receive(message)
    directories = rnd.close()
    assert 3 not in directories
    # Site 3 never advertised, so nothing from it is expected any more, even if well formed.
    stale = ManualRound(n=5, seed="late")
    stale.begin()
    stale.step()
    bundle_from_3 = stale.collect()[3]
    with pytest.raises(UnexpectedMessageError):
        rnd.server.receive(bundle_from_3)


# ------------------------------------------------------------------------------- client
def _wrong_types(state: ClientState):
    expected = EXPECTED_BY_STATE.get(state)
    return [cls for cls in SERVER_TYPES if cls is not expected]


CLIENT_CASES = [
    (state, cls)
    for state in [*ACTIVE_STATES, ClientState.DONE]
    for cls in _wrong_types(state)
]


@pytest.mark.parametrize("state, wrong", CLIENT_CASES, ids=lambda x: getattr(x, "value", getattr(x, "__name__", x)))
def test_client_refuses_out_of_order_message(honest: ManualRound, state: ClientState, wrong: type) -> None:
    client = honest.client_in_state(1, state)
    with pytest.raises(UnexpectedMessageError) as info:
        client.handle(honest.server_message(wrong, site=1))
    assert wrong.__name__ in str(info.value)
    assert client.state is ClientState.ABORTED
    assert client.abort_reason == str(info.value)
    # Aborted for good: even the message it was waiting for is now refused.
    follow_up = EXPECTED_BY_STATE.get(state, SERVER_TYPES[0])
    with pytest.raises(ProtocolAbort):
        client.handle(honest.server_message(follow_up, site=1))
    with pytest.raises(ProtocolAbort):
        client.handle(honest.server_message(wrong, site=1))
    assert client.state is ClientState.ABORTED


@pytest.mark.parametrize("state", ACTIVE_STATES, ids=lambda s: s.value)
def test_client_refuses_non_messages(honest: ManualRound, state: ClientState) -> None:
    client = honest.client_in_state(2, state)
    with pytest.raises(UnexpectedMessageError):
        client.handle(honest.client_message(CLIENT_TYPES[STAGES.index(EXPECTED_BY_STATE[state].STAGE)], site=2))
    assert client.state is ClientState.ABORTED


@pytest.mark.parametrize("state", ACTIVE_STATES, ids=lambda s: s.value)
def test_client_accepts_the_expected_message_and_advances(honest: ManualRound, state: ClientState) -> None:
    """Positive control: in each state the expected message is accepted and reproduces the
    recorded reply byte for byte."""
    client = honest.client_in_state(2, state)
    expected = EXPECTED_BY_STATE[state]
    message = honest.server_message(expected, site=2)
    reply = client.handle(message)
    assert reply.encode() == honest.from_clients[expected.STAGE][2].encode()
    assert client.state is not state and client.state is not ClientState.ABORTED


def test_client_replay_of_the_same_message_is_refused(honest: ManualRound) -> None:
    client = honest.client_in_state(0, ClientState.ADVERTISED)
    directory = honest.server_message(EXPECTED_BY_STATE[ClientState.ADVERTISED], site=0)
    client.handle(directory)
    with pytest.raises(UnexpectedMessageError):
        client.handle(directory)
    assert client.state is ClientState.ABORTED


def test_client_states_follow_the_documented_order(honest: ManualRound) -> None:
    client = honest.fresh_client(3)
    seen = [client.state]
    for stage in Stage:
        client.handle(honest.to_clients[stage][3])
        seen.append(client.state)
    assert seen == [
        ClientState.NEW, ClientState.ADVERTISED, ClientState.SHARED, ClientState.MASKED,
        ClientState.CONFIRMED, ClientState.DONE,
    ]
    assert client.stage is Stage.UNMASK


# ------------------------------------------------------------------------------- server rejections
def test_forged_advertisement_is_dropped_and_round_goes_on_without_the_site() -> None:
    rnd = ManualRound(n=5, seed="forged-ad")
    rnd.begin()
    replies = rnd.collect()
    forged = dataclasses.replace(replies[4], signature=replies[3].signature)  # not site 4's signature
    for site, message in replies.items():
        rnd.server.receive(forged if site == 4 else message)
    assert "not signed" in rnd.server.rejected[4]
    directories = rnd.close()
    assert set(directories) == {0, 1, 2, 3}
    assert all(4 not in {e.sender for e in d.entries} for d in directories.values())
    result = rnd.run()
    assert result.survivors == frozenset({0, 1, 2, 3})
    assert np.abs(result.total - rnd.vectors[:4].sum(axis=0)).max() <= 5 / rnd.round_config.scale


def test_masked_input_of_wrong_shape_or_dtype_counts_as_a_dropout() -> None:
    """A site whose upload is unusable is left out; its pairwise masks are removed via its key
    shares, so the others' sum is still exact."""
    for bad_values in (np.zeros(3, dtype=np.uint32), np.zeros(6, dtype=np.uint64)):
        rnd = ManualRound(n=5, seed="bad-upload")
        rnd.begin()
        rnd.step()
        rnd.step()
        replies = rnd.collect()
        for site, message in replies.items():
            if site == 2:
                message = dataclasses.replace(message, values=bad_values)
            rnd.server.receive(message)
        assert 2 in rnd.server.rejected
        rnd.close()
        result = rnd.run()
        assert result.survivors == frozenset({0, 1, 3, 4})
        expected = rnd.vectors[[0, 1, 3, 4]].sum(axis=0)
        assert np.abs(result.total - expected).max() <= 5 / rnd.round_config.scale
        assert result.total_weight == pytest.approx(4.0, abs=1e-6)


def test_bad_survivor_signature_is_not_counted() -> None:
    rnd = ManualRound(n=5, seed="bad-sig")
    rnd.begin()
    for _ in range(3):
        rnd.step()
    replies = rnd.collect()
    for site, message in replies.items():
        if site == 1:
            message = dataclasses.replace(message, signature=bytes(64))
        rnd.server.receive(message)
    assert 1 in rnd.server.rejected
    requests = rnd.close()
    assert 1 not in requests
    assert all(1 not in {s for s, _ in r.signatures} for r in requests.values())
    result = rnd.run()
    # Site 1 sent its masked input, so it is still in the sum.
    assert result.survivors == frozenset(range(5))
    assert np.abs(result.total - rnd.vectors.sum(axis=0)).max() <= 5 / rnd.round_config.scale


def test_share_bundle_addressed_outside_the_neighbourhood_is_dropped() -> None:
    from securefed.secagg import SecAggConfig

    rnd = ManualRound(n=9, seed="bundle", config=SecAggConfig(neighbors=4))
    rnd.begin()
    rnd.step()
    replies = rnd.collect()
    bundle = replies[0]
    outsider = next(s for s in range(9) if s != 0 and s not in rnd.server.graph.neighbours(0))
    item = bundle.items[0]
    bad = dataclasses.replace(bundle, items=(dataclasses.replace(item, recipient=outsider), *bundle.items[1:]))
    for site, message in replies.items():
        rnd.server.receive(bad if site == 0 else message)
    assert "outside its neighbourhood" in rnd.server.rejected[0]
    rnd.close()
    assert 0 not in rnd.server.u2
