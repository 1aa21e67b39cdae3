"""Bad inputs and configurations are refused up front, with every problem named at once."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from secagg_helpers import ManualRound, federation
from securefed.errors import ConfigError, ProtocolAbort, ProtocolError, UnexpectedMessageError
from securefed.primitives.keys import Roster, SiteIdentity
from securefed.primitives.randomness import SeededRandom
from securefed.secagg import ClientState, SecAggClient, SecAggConfig, SecAggServer, Stage, secure_sum
from securefed.secagg.messages import KeyDirectory, RoundSetup

GOOD = np.random.default_rng(0).uniform(-1, 1, size=(4, 6))


def _problems(excinfo) -> list[str]:
    assert isinstance(excinfo.value, ConfigError)
    assert isinstance(excinfo.value, ValueError)  # callers catching ValueError still catch it
    return excinfo.value.problems


# ------------------------------------------------------------------------------- vectors
@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_values_name_the_vector_and_index(bad: float, word: str) -> None:
    vectors = GOOD.copy()
    vectors[2, 4] = bad
    with pytest.raises(ConfigError) as info:
        secure_sum(vectors, seed=0, workers=1)
    (problem,) = _problems(info)
    assert "vector 2" in problem and "index 4" in problem and word in problem


def test_every_bad_vector_is_listed() -> None:
    vectors = [GOOD[0], np.array([1.0, np.nan, 0, 0, 0, np.nan]), GOOD[2], np.array([np.inf] * 6)]
    with pytest.raises(ConfigError) as info:
        secure_sum(vectors, seed=0, workers=1)
    problems = _problems(info)
    assert len(problems) == 2
    assert "vector 1 has 2 NaN/inf" in problems[0] and "index 1" in problems[0]
    assert "vector 3 has 6 NaN/inf" in problems[1] and "index 0" in problems[1]
    assert "2 configuration problems" in str(info.value)


def test_different_lengths() -> None:
    with pytest.raises(ConfigError) as info:
        secure_sum([np.zeros(5), np.zeros(5), np.zeros(4)], seed=0, workers=1)
    assert "different lengths [4, 5]" in str(info.value)


def test_two_dimensional_vectors() -> None:
    with pytest.raises(ConfigError) as info:
        secure_sum([np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3))], seed=0, workers=1)
    problems = _problems(info)
    assert len(problems) == 3 and "vector 0 has shape (2, 3)" in problems[0]
    with pytest.raises(ConfigError, match="shape"):
        secure_sum(np.zeros((3, 2, 2)), seed=0, workers=1)


@pytest.mark.parametrize(
    "rows",
    [
        [np.array(["a", "b"]), np.array(["c", "d"])],
        [np.array([1 + 2j, 3j]), np.array([1j, 0j])],
        [np.array([object(), object()]), np.array([object(), object()])],
        [np.array(["2020-01-01", "2020-01-02"], dtype="datetime64[D]")] * 2,
    ],
    ids=["str", "complex", "object", "datetime"],
)
def test_non_numeric_dtype(rows) -> None:
    with pytest.raises(ConfigError) as info:
        secure_sum(rows, seed=0, workers=1)
    assert "dtype" in str(info.value) and "vector 0" in str(info.value)


@pytest.mark.parametrize("vectors", [[np.zeros(3)], [], np.zeros((1, 3))], ids=["one", "none", "one-row"])
def test_fewer_than_two_sites(vectors) -> None:
    with pytest.raises(ConfigError, match="at least 2 sites"):
        secure_sum(vectors, seed=0, workers=1)


def test_empty_vectors() -> None:
    with pytest.raises(ConfigError, match="empty"):
        secure_sum([np.zeros(0), np.zeros(0)], seed=0, workers=1)


@pytest.mark.parametrize("value", ["vectors", b"\x00\x01", 3, None])
def test_vectors_of_the_wrong_kind(value) -> None:
    with pytest.raises(ConfigError):
        secure_sum(value, seed=0, workers=1)


def test_config_must_be_a_secagg_config() -> None:
    with pytest.raises(ConfigError, match="SecAggConfig"):
        secure_sum(GOOD, {"neighbors": 4}, seed=0, workers=1)


@pytest.mark.parametrize("workers", [0, -1])
def test_bad_worker_count(workers: int) -> None:
    with pytest.raises(ConfigError, match="workers"):
        secure_sum(GOOD, seed=0, workers=workers)


# ------------------------------------------------------------------------------- weights
@pytest.mark.parametrize(
    "weights, phrase",
    [
        ([1.0, 1.0, 1.0], "3 weights for 4 vectors"),
        ([1.0] * 5, "5 weights for 4 vectors"),
        ([1.0, -0.5, 1.0, 1.0], "non-negative"),
        ([1.0, np.nan, 1.0, 1.0], "finite"),
        ([1.0, np.inf, 1.0, 1.0], "finite"),
        ([1.0, 1.0, 2.5, 1.0], "max_weight"),
    ],
)
def test_bad_weights(weights, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        secure_sum(GOOD, SecAggConfig(max_weight=2.0), weights=weights, seed=0, workers=1)
    assert phrase in str(info.value)


def test_weight_exactly_max_weight_is_fine() -> None:
    result = secure_sum(GOOD, SecAggConfig(max_weight=2.0), weights=[2.0, 0.0, 1.0, 2.0], seed=0, workers=1)
    expected = 2.0 * GOOD[0] + GOOD[2] + 2.0 * GOOD[3]
    assert np.abs(result.total - expected).max() <= 4 / result.config.scale + 1e-12


# ------------------------------------------------------------------------------- dropouts
def test_unknown_stage_name_in_dropouts() -> None:
    with pytest.raises(ConfigError) as info:
        secure_sum(GOOD, dropouts={"masked-input": [1]}, seed=0, workers=1)
    text = str(info.value)
    assert "masked-input" in text
    for stage in Stage:
        assert stage.value in text  # the valid names are listed


@pytest.mark.parametrize("site", [4, -1, 100, 1.0, True, "1", None])
def test_out_of_range_or_odd_site_indices_in_dropouts(site) -> None:
    with pytest.raises(ConfigError) as info:
        secure_sum(GOOD, dropouts={"share_keys": [site]}, seed=0, workers=1)
    assert "0..3" in str(info.value)


def test_all_bad_dropout_sites_are_listed() -> None:
    with pytest.raises(ConfigError) as info:
        secure_sum(GOOD, dropouts={"advertise_keys": [7, 0], "unmask": [-2, 3, 9]}, seed=0, workers=1)
    problems = _problems(info)
    assert len(problems) == 3
    assert any("7" in p for p in problems) and any("-2" in p for p in problems) and any("9" in p for p in problems)


def test_numpy_integer_site_indices_are_accepted() -> None:
    result = secure_sum(GOOD, dropouts={"masked_input": np.array([1])}, seed=0, workers=1)
    assert result.survivors == {0, 2, 3}


# ------------------------------------------------------------------------------- SecAggConfig
@pytest.mark.parametrize("neighbors", [3, 5, 0, -2, 1, "x", "AUTO", 2.0, 4.0, True, [4]])
def test_bad_neighbors(neighbors) -> None:
    with pytest.raises(ConfigError) as info:
        SecAggConfig(neighbors=neighbors)
    assert "neighbors" in str(info.value)


@pytest.mark.parametrize("neighbors", [None, "auto", 2, 4, 30])
def test_good_neighbors(neighbors) -> None:
    assert SecAggConfig(neighbors=neighbors).neighbors == neighbors


@pytest.mark.parametrize("bit_width", [16, 8, 128, 0, 31, "32"])
def test_bad_bit_width(bit_width) -> None:
    with pytest.raises(ConfigError, match="bit_width"):
        SecAggConfig(bit_width=bit_width)


@pytest.mark.parametrize("clip", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "1", None, True])
def test_bad_clip(clip) -> None:
    with pytest.raises(ConfigError, match="clip"):
        SecAggConfig(clip=clip)


@pytest.mark.parametrize("field", ["scale", "max_weight"])
@pytest.mark.parametrize("value", [0.0, -2.0, math.nan, math.inf])
def test_bad_scale_and_max_weight(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        SecAggConfig(**{field: value})


@pytest.mark.parametrize("threshold", [1, 0, -3, 2.5, True, "3"])
def test_bad_threshold_type_or_value(threshold) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        SecAggConfig(threshold=threshold)


@pytest.mark.parametrize("kwargs", [{"dropout_rate": 1.0}, {"dropout_rate": -0.1}, {"corrupt_fraction": 0.5}])
def test_bad_rates(kwargs) -> None:
    with pytest.raises(ConfigError):
        SecAggConfig(**kwargs)


def test_all_config_problems_are_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        SecAggConfig(neighbors=3, threshold=1, bit_width=16, clip=0.0, max_weight=math.nan,
                     dropout_rate=1.5, corrupt_fraction=0.7, scale=-1.0)
    problems = _problems(info)
    for word in ("neighbors", "threshold", "bit_width", "clip", "max_weight", "dropout_rate",
                 "corrupt_fraction", "scale"):
        assert sum(word in p for p in problems) >= 1, f"{word} missing from {problems}"
    assert len(problems) == 8
    assert str(info.value).startswith("8 configuration problems")


def test_overflowing_scale_is_refused_by_secure_sum_before_the_round() -> None:
    with pytest.raises(ConfigError) as info:
        secure_sum(GOOD, SecAggConfig(scale=2.0**40), seed=0, workers=1)
    assert "32-bit" in str(info.value)
    # A 64-bit ring has room for it.
    result = secure_sum(GOOD, SecAggConfig(scale=2.0**40, bit_width=64), seed=0, workers=1)
    assert np.abs(result.total - GOOD.sum(axis=0)).max() <= 1e-9


def test_overflowing_scale_is_refused_when_the_config_is_made() -> None:
    """clip * max_weight * scale = 2**40 cannot fit one signed 32-bit value, whatever the number
    of sites, so the config itself is unusable and must say so before anything runs."""
    with pytest.raises(ConfigError) as info:
        SecAggConfig(scale=2.0**40)
    assert "scale" in str(info.value)
    with pytest.raises(ConfigError) as info:
        SecAggConfig(scale=2.0**20, clip=4.0, max_weight=2.0**10)  # 2**32 > 2**31 - 1
    assert "scale" in str(info.value)


def test_overflowing_scale_is_listed_with_other_problems() -> None:
    with pytest.raises(ConfigError) as info:
        SecAggConfig(neighbors=5, scale=2.0**40)
    problems = _problems(info)
    assert len(problems) == 2
    assert any("neighbors" in p for p in problems) and any("scale" in p for p in problems)


def test_largest_fitting_scale_is_accepted() -> None:
    config = SecAggConfig(scale=2.0**28)  # 4 sites * 2**28 < 2**31
    result = secure_sum(GOOD, config, seed=0, workers=1)
    assert result.config.scale == 2.0**28
    with pytest.raises(ConfigError, match="lower scale"):
        secure_sum(np.zeros((9, 3)), config, seed=0, workers=1)  # 9 * 2**28 overflows


def test_too_many_sites_for_the_ring_ask_for_64_bits() -> None:
    with pytest.raises(ConfigError, match="bit_width=64"):
        secure_sum(np.zeros((9, 2)), SecAggConfig(scale=2.0**28), seed=0, workers=1)


# ------------------------------------------------------------------------------- roster
def test_duplicate_site_names_in_roster() -> None:
    rng = SeededRandom("dups")
    a = SiteIdentity.generate("hospital-a", rng.fork("1"))
    b = SiteIdentity.generate("hospital-a", rng.fork("2"))
    c = SiteIdentity.generate("hospital-c", rng.fork("3"))
    with pytest.raises(ConfigError) as info:
        Roster([a.public(), b.public(), c.public()])
    assert "'hospital-a' appears 2 times" in str(info.value)
    assert len(Roster([a.public(), c.public()])) == 2


def test_client_not_in_roster() -> None:
    identities, roster = federation(3, "outsider")
    stranger = SiteIdentity.generate("stranger", SeededRandom("s"))
    with pytest.raises(ProtocolAbort, match="not in the federation roster"):
        SecAggClient(identity=stranger, roster=roster, vector=np.zeros(3), rng=SeededRandom("r"), previous_round=None)


# ------------------------------------------------------------------------------- replays
@pytest.fixture(scope="module")
def recorded() -> ManualRound:
    rnd = ManualRound(n=4, seed="bad-input")
    rnd.run()
    return rnd


@pytest.mark.parametrize("stage", list(Stage)[1:], ids=lambda s: s.value)
@pytest.mark.parametrize("field", ["round_id", "config_digest"])
def test_message_from_another_round_is_refused(recorded: ManualRound, stage: Stage, field: str) -> None:
    state = [ClientState.ADVERTISED, ClientState.SHARED, ClientState.MASKED, ClientState.CONFIRMED][
        list(Stage).index(stage) - 1
    ]
    message = recorded.to_clients[stage][1]
    other = recorded.round_id + 1 if field == "round_id" else bytes(reversed(message.config_digest))
    client = recorded.client_in_state(1, state)
    with pytest.raises(ProtocolAbort) as info:
        client.handle(dataclasses.replace(message, **{field: other}))
    assert info.value.stage == stage.value
    assert client.state is ClientState.ABORTED
    # Control: the genuine message is accepted by an identical client.
    recorded.client_in_state(1, state).handle(message)


def test_old_round_setup_is_refused(recorded: ManualRound) -> None:
    setup = recorded.to_clients[Stage.ADVERTISE_KEYS][0]
    for previous in (recorded.round_id, recorded.round_id + 5):
        client = recorded.fresh_client(0, previous_round=previous)
        with pytest.raises(ProtocolAbort, match="replay"):
            client.handle(setup)
    assert recorded.fresh_client(0, previous_round=recorded.round_id - 1).handle(setup).sender == 0


def test_round_for_another_roster_is_refused(recorded: ManualRound) -> None:
    config = dataclasses.replace(recorded.round_config, roster_digest=bytes(32))
    with pytest.raises(ProtocolAbort, match="different federation roster"):
        recorded.fresh_client(0).handle(RoundSetup.for_config(config))


def test_round_of_wrong_vector_length_or_weight_is_refused(recorded: ManualRound) -> None:
    config = dataclasses.replace(recorded.round_config, vector_length=recorded.length + 1)
    with pytest.raises(ProtocolAbort, match="shape"):
        recorded.fresh_client(0).handle(RoundSetup.for_config(config))
    heavy = SecAggClient(identity=recorded.identities[0], roster=recorded.roster, vector=recorded.vectors[0],
                         weight=1.5, rng=SeededRandom("heavy"), previous_round=None)
    with pytest.raises(ProtocolAbort, match="max_weight"):
        heavy.handle(recorded.to_clients[Stage.ADVERTISE_KEYS][0])


def test_round_naming_sites_outside_the_roster_is_refused(recorded: ManualRound) -> None:
    """A coordinator lists a fourth participant, though the roster has three sites. The client
    refuses at setup with ProtocolAbort naming the problem, and ends aborted."""
    rnd = ManualRound(n=3, seed="outside")
    config = dataclasses.replace(rnd.round_config, participants=(0, 1, 2, 3), threshold=3, scale=2.0**20)
    client = rnd.fresh_client(0)
    with pytest.raises(ProtocolAbort, match="not in the roster"):
        client.handle(RoundSetup.for_config(config))
    assert client.state is ClientState.ABORTED


def test_advertisement_from_outside_the_roster_is_refused(recorded: ManualRound) -> None:
    """An advertisement relayed under an id outside the roster ends in ProtocolAbort, not a crash."""
    rnd = ManualRound(n=3, seed="outside-ad")
    setup = RoundSetup.for_config(rnd.round_config)
    ads = [rnd.fresh_client(i).handle(setup) for i in (1, 2)]
    forged = dataclasses.replace(ads[0], sender=7)
    config = rnd.round_config
    directory = KeyDirectory(round_id=config.round_id, config_digest=config.digest, entries=(*ads[1:], forged))
    client = rnd.fresh_client(0)
    client.handle(setup)
    with pytest.raises(ProtocolAbort):
        client.handle(directory)
    assert client.state is ClientState.ABORTED


def test_server_refuses_round_naming_sites_outside_the_roster() -> None:
    rnd = ManualRound(n=3, seed="outside-server")
    config = dataclasses.replace(rnd.round_config, participants=(0, 1, 2, 3), threshold=3, scale=2.0**20)
    try:
        server = SecAggServer(config, rnd.roster)
    except (ProtocolAbort, ConfigError):
        return
    server.begin()
    ad = rnd.fresh_client(1).handle(RoundSetup.for_config(config))
    with pytest.raises(ProtocolError):
        server.receive(dataclasses.replace(ad, sender=3))


# ------------------------------------------------------------------------------- secrets
def test_abort_reason_contains_no_secret_material(recorded: ManualRound) -> None:
    client = recorded.client_in_state(2, ClientState.SHARED)
    secrets = {
        "masking secret": client._s_keys.secret,
        "encryption secret": client._c_keys.secret,
        "self-mask seed": client._self_mask_seed,
        "long-term encryption secret": client.identity.encryption_secret,
        **{f"share of {o}": share for o, pair in client._held.items() for share in pair},
    }
    delivery = recorded.to_clients[Stage.MASKED_INPUT][2]
    item = delivery.items[0]
    broken = dataclasses.replace(item, ciphertext=item.ciphertext[:-1] + bytes([item.ciphertext[-1] ^ 1]))
    with pytest.raises(ProtocolAbort) as info:
        client.handle(dataclasses.replace(delivery, items=(broken, *delivery.items[1:])))
    texts = [str(info.value), repr(info.value), client.abort_reason]
    for label, secret in secrets.items():
        assert len(secret) >= 16
        for text in texts:
            for form in (secret.hex(), secret.hex().upper(), repr(secret)[2:-1], secret[:8].hex()):
                assert form not in text, f"the abort message reveals the {label}"
    # The aborted client also dropped its round secrets.
    assert client._s_keys is None and client._self_mask_seed is None and client._held is None
    assert client.state is ClientState.ABORTED


def test_unexpected_message_error_is_not_an_abort_subclass() -> None:
    assert not issubclass(UnexpectedMessageError, ProtocolAbort)
    assert issubclass(UnexpectedMessageError, ProtocolError)


@pytest.mark.parametrize("weights", [["a", "b", "c", "d"], "abcd", [[1.0], [1.0], [1.0], [1.0, 2.0]]],
                         ids=["strings", "string", "ragged"])
def test_non_numeric_weights_are_a_config_error(weights) -> None:
    with pytest.raises(ConfigError, match="weight"):
        secure_sum(GOOD, weights=weights, seed=0, workers=1)


@pytest.mark.parametrize("dropouts", [{"unmask": 3}, {"unmask": None}, ["unmask"]], ids=["int", "none", "list"])
def test_malformed_dropouts_are_a_config_error(dropouts) -> None:
    with pytest.raises(ConfigError):
        secure_sum(GOOD, dropouts=dropouts, seed=0, workers=1)


def test_threshold_above_the_neighbourhood() -> None:
    with pytest.raises(ConfigError, match="threshold 5 is more than the 4 sites"):
        secure_sum(GOOD, SecAggConfig(threshold=5), seed=0, workers=1)
    with pytest.raises(ConfigError, match="threshold 6 is more than the 5 sites"):
        secure_sum(np.zeros((9, 3)), SecAggConfig(neighbors=4, threshold=6), seed=0, workers=1)
