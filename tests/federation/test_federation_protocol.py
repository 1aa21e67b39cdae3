"""Sites and coordinator over the transport seam: sums, dropouts, and what the coordinator sees.

The learners are numpy stand-ins (the training is not under test here); the sites, coordinator,
messages, transport and secure aggregation are the real ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from securefed.federation.messages import (
    PlainUpdate,
    ProtocolRelay,
    RoundStart,
    SiteRefusal,
    decode_federation_message,
    model_digest,
)
from securefed.federation.transport import FaultInjectingTransport
from securefed.secagg.client import encode_input
from securefed.secagg.messages import MaskedInput, decode_message

from federation_helpers import small_federation

SECAGG_REPLIES = {"KeyAdvertisement", "ShareBundle", "MaskedInput", "ConsistencySignature", "UnmaskShares"}


def _expected_mean(fed, model, names):
    return np.mean([(fed.learners[n].target - model) * 0.5 for n in names], axis=0)


def test_secure_round_returns_the_mean_update_and_the_coordinator_sees_only_masked_payloads(tmp_path):
    fed = small_federation(tmp_path, n=5)
    model = np.zeros(40, dtype=np.float32)
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model,
                                        graph_seed=bytes(32))
    assert outcome.failure is None and set(outcome.survivors) == set(fed.sites)
    np.testing.assert_allclose(outcome.mean_update, _expected_mean(fed, model, fed.sites), atol=1e-6)

    updates = {n: ((l.target - model) * 0.5).astype(np.float32) for n, l in fed.learners.items()}
    received = fed.recorder.transcript.received()
    assert received, "the coordinator received nothing"
    for entry in received:
        message = decode_federation_message(entry.data)
        assert isinstance(message, ProtocolRelay), f"{entry.site} sent a {type(message).__name__}"
        inner = decode_message(message.payload)
        assert type(inner).__name__ in SECAGG_REPLIES
        own = updates[entry.site].tobytes()
        for other in updates.values():  # no site's plaintext update, not even a 32-byte slice of it
            assert other.tobytes()[:32] not in entry.data
        assert own[8:40] not in entry.data
        if isinstance(inner, MaskedInput):
            config = None
            for sent in fed.recorder.transcript.entries:
                if sent.direction == "sent" and sent.site == entry.site and sent.kind != "ModelRelease":
                    start = decode_federation_message(sent.data)
                    if isinstance(start, RoundStart):
                        config = decode_message(start.setup).config
            assert config is not None
            # The masked vector is far from the site's fixed-point encoding (uniform noise in Z_2^32).
            plain = encode_input(config, updates[entry.site], 1.0, _ZeroRounding())
            differs = np.mean(inner.values[:-1] != plain[:-1])
            assert differs > 0.95


class _ZeroRounding:
    """Deterministic rounding source for re-encoding (the comparison only needs the rough value)."""

    def random_bytes(self, n: int) -> bytes:
        return bytes(n)

    def fork(self, label: str):
        return self


@pytest.mark.parametrize("exchange", [1, 2, 3, 4, 5])
def test_a_site_that_vanishes_at_any_stage_leaves_a_correct_mean_of_the_others(tmp_path, exchange):
    vanished = "h2"
    fed = small_federation(
        tmp_path, n=6,
        transport_wrapper=lambda inner: FaultInjectingTransport(inner, lambda i, site, _: site == vanished and i >= exchange),
    )
    model = np.full(40, 0.1, dtype=np.float32)
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model,
                                        graph_seed=bytes(32))
    assert outcome.failure is None
    # A site lost before its masked input is out of the sum; lost afterwards, it is in it.
    expected_in = exchange > 3
    assert (vanished in outcome.survivors) == expected_in
    np.testing.assert_allclose(outcome.mean_update, _expected_mean(fed, model, outcome.survivors), atol=1e-6)


def test_too_many_dropouts_fail_the_round_without_an_update(tmp_path):
    gone = {"h0", "h1", "h2"}
    fed = small_federation(tmp_path, n=5, transport_wrapper=lambda inner: FaultInjectingTransport(
        inner, lambda i, site, _: site in gone and i >= 3))
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites),
                                        model=np.zeros(40, np.float32), graph_seed=bytes(32))
    assert outcome.mean_update is None and "aborted" in outcome.failure


def test_a_site_refuses_to_send_its_update_in_the_clear_to_a_downgrading_coordinator(tmp_path):
    fed = small_federation(tmp_path, n=3)
    model = np.zeros(40, dtype=np.float32)
    request = RoundStart(1, 1000, "plain", model, b"").encode()
    replies = fed.recorder.exchange({n: request for n in fed.sites})
    for name, data in replies.items():
        reply = decode_federation_message(data)
        assert isinstance(reply, SiteRefusal) and "refused" in reply.reason
        assert not isinstance(reply, PlainUpdate)
    assert all(not learner.calls for learner in fed.learners.values()), "a site trained for a refused round"


def test_stale_protocol_rounds_and_replays_of_released_rounds_are_refused(tmp_path):
    fed = small_federation(tmp_path, n=3)
    model = np.zeros(40, dtype=np.float32)
    fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model, graph_seed=bytes(32))

    # The same protocol round id again: refused before any training.
    again = fed.coordinator.run_round(round_=2, protocol_round=1000, cohort=list(fed.sites), model=model,
                                      graph_seed=bytes(32))
    assert again.mean_update is None and all("not above" in r for r in again.refusals.values())

    # Round 1 again under a fresh id, from the same model: every update of round 1 already left,
    # so every site sits it out. Otherwise a coordinator could replay the round without one site
    # and subtract the two sums to get that site's update.
    for cohort in (list(fed.sites), ["h0", "h1"]):
        replay = fed.coordinator.run_round(round_=1, protocol_round=1001 + len(cohort), cohort=cohort, model=model,
                                           graph_seed=bytes(32))
        assert replay.mean_update is None and all("sitting out" in r for r in replay.refusals.values())
        assert set(replay.refusals) == set(cohort)
    for learner in fed.learners.values():
        assert learner.calls == [("round-1", False)]
    state = fed.sites["h0"].workspace.load_state()
    assert state.previous_protocol_round == 1000 and state.trained == {1: model_digest(model).hex()}
    assert state.released == {1}


def test_a_round_cut_short_before_any_update_left_is_replayed_from_the_same_model_only(tmp_path):
    # Every reply of the first exchange is lost: the sites trained but sent only their keys.
    fed = small_federation(tmp_path, n=3, transport_wrapper=lambda inner: FaultInjectingTransport(
        inner, lambda i, site, _: i == 1))
    model = np.zeros(40, dtype=np.float32)
    first = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model,
                                      graph_seed=bytes(32))
    assert first.mean_update is None
    other = np.full(40, 0.5, dtype=np.float32)
    refused = fed.coordinator.run_round(round_=1, protocol_round=1001, cohort=list(fed.sites), model=other,
                                        graph_seed=bytes(32))
    assert refused.mean_update is None and all("different model" in r for r in refused.refusals.values())
    replay = fed.coordinator.run_round(round_=1, protocol_round=1002, cohort=list(fed.sites), model=model,
                                       graph_seed=bytes(32))
    assert replay.failure is None
    np.testing.assert_allclose(replay.mean_update, _expected_mean(fed, model, fed.sites), atol=1e-6)
    for learner in fed.learners.values():  # the replay is told so: it reuses the round's charge
        assert learner.calls == [("round-1", False), ("round-1", True)]


def test_a_bogus_round_configuration_is_refused_before_training_or_charging(tmp_path):
    from securefed.federation.messages import RoundStart
    from securefed.secagg.config import RoundConfig
    from securefed.secagg.messages import RoundSetup

    fed = small_federation(tmp_path, n=5)
    honest = fed.coordinator.policy.round_config(n_sites=5, vector_length=40, round_id=1000,
                                                 roster_digest=fed.roster.digest(), graph_seed=bytes(32))
    weak = RoundConfig(**{**{f: getattr(honest, f) for f in ("round_id", "roster_digest", "participants",
                                                             "neighbors", "graph_seed", "vector_length",
                                                             "bit_width", "clip", "scale", "max_weight")},
                          "threshold": 2})
    start = RoundStart(1, 1000, "secagg", np.zeros(40, np.float32), RoundSetup.for_config(weak).encode()).encode()
    replies = fed.recorder.exchange({n: start for n in fed.sites})
    for data in replies.values():
        assert "secure aggregation refused" in decode_federation_message(data).reason
    assert all(not learner.calls for learner in fed.learners.values())
    assert fed.sites["h0"].workspace.load_state().trained == {}


def test_a_site_whose_training_fails_sits_the_round_out_and_the_others_go_on(tmp_path):
    fed = small_federation(tmp_path, n=5)

    def broken(global_vector, *, round_id, replay_charged=False):
        raise FloatingPointError("the loss diverged")

    fed.learners["h2"].train_round = broken
    model = np.zeros(40, dtype=np.float32)
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model,
                                        graph_seed=bytes(32))
    assert outcome.refusals == {"h2": "local training failed (FloatingPointError)"}
    assert outcome.failure is None and "h2" not in outcome.survivors
    np.testing.assert_allclose(outcome.mean_update, _expected_mean(fed, model, outcome.survivors), atol=1e-6)
    assert any("the loss diverged" in line for line in fed.sites["h2"].refusals)  # the detail stays local
    assert fed.sites["h2"].workspace.load_state().trained == {}


def test_a_site_out_of_budget_refuses_and_the_round_goes_on_without_it(tmp_path):
    fed = small_federation(tmp_path, n=5)
    fed.learners["h4"].budget_rounds = 0
    model = np.zeros(40, dtype=np.float32)
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model,
                                        graph_seed=bytes(32))
    assert outcome.refusals == {"h4": "privacy budget exhausted"}
    assert set(outcome.survivors) == {"h0", "h1", "h2", "h3"}
    np.testing.assert_allclose(outcome.mean_update, _expected_mean(fed, model, outcome.survivors), atol=1e-6)


def test_spoofed_senders_and_garbage_are_rejected_and_the_round_completes(tmp_path):
    def tamper(inner):
        class Swap:
            def exchange(self, outgoing):
                replies = inner.exchange(outgoing)
                if "h1" in replies and "h0" in replies and len(replies) == 5:
                    replies["h1"] = replies["h0"]  # h1's slot carries h0's message
                    replies["h3"] = b"\x00garbage"
                return replies

            def close(self):
                inner.close()
        return Swap()

    fed = small_federation(tmp_path, n=5, transport_wrapper=tamper)
    model = np.zeros(40, dtype=np.float32)
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model,
                                        graph_seed=bytes(32))
    assert "sender" in outcome.rejected["h1"] and "h3" in outcome.rejected
    assert outcome.failure is None and {"h1", "h3"}.isdisjoint(outcome.survivors)
    np.testing.assert_allclose(outcome.mean_update, _expected_mean(fed, model, outcome.survivors), atol=1e-6)


def test_plain_baseline_averages_updates_in_the_clear(tmp_path):
    fed = small_federation(tmp_path, n=3, aggregation="plain")
    model = np.zeros(40, dtype=np.float32)
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model,
                                        graph_seed=bytes(32))
    np.testing.assert_allclose(outcome.mean_update, _expected_mean(fed, model, fed.sites), atol=1e-7)
    kinds = {e.kind for e in fed.recorder.transcript.received()}
    assert kinds == {"message"}  # the helper's recorder does not classify; decode instead
    assert all(isinstance(decode_federation_message(e.data), PlainUpdate) for e in fed.recorder.transcript.received())


def test_sites_record_their_own_evaluation_of_each_released_model(tmp_path):
    fed = small_federation(tmp_path, n=3)
    model = np.zeros(40, dtype=np.float32)
    fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model, graph_seed=bytes(32))
    acked = fed.coordinator.release(round_=1, model=model + 1, sites=list(fed.sites))
    assert acked == set(fed.sites)
    rows = fed.sites["h0"].workspace.metrics()
    assert [r["round"] for r in rows] == [0, 1]
    target = fed.learners["h0"].target
    assert rows[1]["metrics"]["distance"] == pytest.approx(float(np.linalg.norm(model + 1 - target)))


def test_a_model_of_the_wrong_size_is_refused_before_anything_is_charged(tmp_path):
    fed = small_federation(tmp_path, n=4)
    wrong = np.zeros(41, dtype=np.float32)  # the round's configuration agrees with it; the sites' model does not
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=wrong,
                                        graph_seed=bytes(32))
    assert outcome.mean_update is None
    assert all("wrong number of parameters" in r for r in outcome.refusals.values())
    assert all(not learner.calls for learner in fed.learners.values())
    assert fed.sites["h0"].workspace.load_state().trained == {}
    poisoned = np.full(40, np.nan, dtype=np.float32)
    outcome = fed.coordinator.run_round(round_=1, protocol_round=1001, cohort=list(fed.sites), model=poisoned,
                                        graph_seed=bytes(32))
    assert all("non-finite" in r for r in outcome.refusals.values())


def test_a_site_that_fails_before_training_can_take_the_round_later_from_any_model(tmp_path):
    fed = small_federation(tmp_path, n=4)
    site = fed.sites["h1"]
    working = site._make_learner
    failures = iter([RuntimeError("the GPU is busy")])

    def flaky():
        for exc in failures:
            raise exc
        return working()

    site._make_learner = flaky
    model = np.zeros(40, dtype=np.float32)
    first = fed.coordinator.run_round(round_=1, protocol_round=1000, cohort=list(fed.sites), model=model,
                                      graph_seed=bytes(32))
    assert first.refusals == {"h1": "the site failed (RuntimeError)"} and first.failure is None
    assert site.workspace.load_state().trained == {}
    other = np.full(40, 0.1, dtype=np.float32)
    second = fed.coordinator.run_round(round_=1, protocol_round=1001, cohort=["h1", "h2"], model=other,
                                       graph_seed=bytes(32))
    assert "h1" not in second.refusals  # h1 had released nothing for round 1: it may take part
