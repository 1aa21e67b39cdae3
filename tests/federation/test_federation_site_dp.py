"""Site-level distributed DP inside federated rounds: charge, noise, decode, settle, replays.

Real sites, coordinator, secure aggregation and ledgers; numpy learners stand in for training.
"""

from __future__ import annotations

import numpy as np
import pytest

from securefed.federation.site_level import SiteLevelDP
from securefed.federation.transport import FaultInjectingTransport
from securefed.privacy.accounting import compose_epsilon
from securefed.privacy.events import DistributedDiscreteGaussian
from securefed.privacy.ledger_records import EntryKind
from securefed.privacy.ledger_verify import verify_ledger_file

from federation_helpers import small_federation

LENGTH = 50


def _site_dp(noise: float = 0.5) -> SiteLevelDP:
    return SiteLevelDP(l2_clip=1.0, noise_multiplier=noise, bit_width=32)


def _entries(fed, name):
    ledger = fed.sites[name]._ledger
    return [e for e in ledger.entries() if e.kind is not EntryKind.GENESIS]


def _run(fed, round_=1, protocol_round=1000, model=None):
    model = np.zeros(LENGTH, np.float32) if model is None else model
    return fed.coordinator.run_round(round_=round_, protocol_round=protocol_round, cohort=list(fed.sites),
                                     model=model, graph_seed=bytes(32))


def test_the_noisy_mean_is_close_to_the_true_mean_and_charges_settle_to_the_survivors(tmp_path):
    site_dp = _site_dp()
    gone = "h3"  # vanishes on the way back from its masked input: not in the sum
    fed = small_federation(tmp_path, n=6, length=LENGTH, site_dp=site_dp, transport_wrapper=lambda inner:
                           FaultInjectingTransport(inner, lambda i, site, _: site == gone and i >= 3))
    outcome = _run(fed)
    assert outcome.failure is None and gone not in outcome.survivors and len(outcome.survivors) == 5
    truth = np.mean([(fed.learners[n].target - 0) * 0.5 for n in outcome.survivors], axis=0)
    encoder = site_dp.encoder(dimension=LENGTH, cohort=6, threshold=fed.coordinator.policy.resolve(6)[1])
    error = np.linalg.norm(outcome.mean_update - truth)
    assert error <= encoder.error_bound(sites=5) / 5
    assert error > 1e-4, "the mean must carry the sites' noise"

    threshold = encoder.config.min_sites
    for name in fed.sites:
        entries = _entries(fed, name)
        charge = entries[0]
        assert charge.kind is EntryKind.CHARGE and isinstance(charge.event, DistributedDiscreteGaussian)
        assert charge.event.sites == threshold and charge.round_id == "round-1"
        if name == gone:  # never learned who survived: the worst case stands
            assert len(entries) == 1
        else:
            settle = entries[1]
            assert settle.kind is EntryKind.SETTLE and settle.event.sites == 5
            ledger = fed.sites[name]._ledger
            assert ledger.spent().epsilon == pytest.approx(compose_epsilon([settle.event], delta=1e-5), rel=1e-12)
        assert verify_ledger_file(fed.sites[name]._ledger.path, fed.sites[name].identity.public()) == []


def test_the_coordinator_receives_only_ring_elements_of_the_padded_length(tmp_path):
    fed = small_federation(tmp_path, n=4, length=LENGTH, site_dp=_site_dp())
    _run(fed)
    from securefed.federation.messages import ProtocolRelay, decode_federation_message
    from securefed.secagg.messages import MaskedInput, decode_message

    masked = [decode_message(decode_federation_message(e.data).payload) for e in fed.recorder.transcript.received()
              if e.kind == "message" and isinstance(decode_federation_message(e.data), ProtocolRelay)]
    uploads = [m for m in masked if isinstance(m, MaskedInput)]
    assert len(uploads) == 4
    assert all(u.values.size == 64 + 1 for u in uploads)  # 50 padded to 64, plus the weight


def test_a_replay_after_the_noised_update_left_is_sat_out_and_no_charge_is_added(tmp_path):
    fed = small_federation(tmp_path, n=5, length=LENGTH, site_dp=_site_dp())
    model = np.zeros(LENGTH, np.float32)
    first = _run(fed, model=model)
    assert first.failure is None
    before = {n: len(_entries(fed, n)) for n in fed.sites}
    again = _run(fed, protocol_round=1001, model=model)  # the crash-and-resume replay of round 1
    assert again.mean_update is None
    assert all("sitting out" in reason for reason in again.refusals.values()) and len(again.refusals) == 5
    assert {n: len(_entries(fed, n)) for n in fed.sites} == before


def test_a_replay_before_anything_left_reuses_the_charge(tmp_path):
    # Every reply of the first exchange is lost: the sites charged and encoded, sent keys only.
    fed = small_federation(tmp_path, n=5, length=LENGTH, site_dp=_site_dp(), transport_wrapper=lambda inner:
                           FaultInjectingTransport(inner, lambda i, site, _: i == 1))
    model = np.zeros(LENGTH, np.float32)
    first = _run(fed, model=model)
    assert first.mean_update is None
    charges = {n: [e.seq for e in _entries(fed, n)] for n in fed.sites}
    assert all(len(seqs) == 1 for seqs in charges.values())
    again = _run(fed, protocol_round=1001, model=model)
    assert again.failure is None and len(again.survivors) == 5
    for name in fed.sites:
        entries = _entries(fed, name)
        assert [e.kind for e in entries] == [EntryKind.CHARGE, EntryKind.SETTLE]
        assert entries[1].settles == charges[name][0]


def test_a_site_without_budget_for_the_site_level_charge_refuses(tmp_path):
    fed = small_federation(tmp_path, n=4, length=LENGTH, site_dp=_site_dp(noise=1.0), ledger_epsilon=0.5)
    outcome = _run(fed)
    assert outcome.mean_update is None
    assert set(outcome.refusals.values()) == {"privacy budget exhausted"}
    assert all(_entries(fed, n) == [] for n in fed.sites)


SITE_DP_RUN = """
[federation]
rounds = 2
sites = 5
seed = 1
aggregation = "{aggregation}"
[privacy]
target_epsilon = 3.0
budget_epsilon = 20.0
[site_dp]
mode = "distributed"
l2_clip = 0.5
noise_multiplier = {noise}
"""


def test_securefed_run_with_site_level_dp_charges_and_settles_every_round(tmp_path):
    import json

    from securefed.primitives.keys import SiteIdentity
    from securefed.privacy.ledger import PrivacyLedger

    from test_federation_cli_run import securefed

    config = tmp_path / "site-dp.toml"
    config.write_text(SITE_DP_RUN.format(aggregation="secagg", noise=2.0))
    done = securefed("run", str(config), "--run-dir", str(tmp_path / "run"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [len(r["survivors"]) for r in summary["rounds"]] == [5, 5]
    workspace = tmp_path / "run" / "sites" / "site-2"
    public = SiteIdentity.load(workspace / "identity.key").public()
    with PrivacyLedger.read(workspace / "ledger.sqlite", public_key=public) as ledger:
        kinds = [(e.round_id, e.kind.value, type(e.event).__name__) for e in ledger.entries()[1:]]
        dp_sgd_only = compose_epsilon([e.event for e in ledger.entries()[1:]
                                       if not isinstance(e.event, DistributedDiscreteGaussian)], delta=1e-5)
    assert kinds == [
        ("round-1", "charge", "DistributedDiscreteGaussian"), ("round-1", "charge", "PoissonSampledGaussian"),
        ("round-1", "settle", "DistributedDiscreteGaussian"),
        ("round-2", "charge", "DistributedDiscreteGaussian"), ("round-2", "charge", "PoissonSampledGaussian"),
        ("round-2", "settle", "DistributedDiscreteGaussian"),
    ]
    assert summary["sites"]["site-2"]["epsilon"] > dp_sgd_only  # both kinds of event are composed


@pytest.mark.parametrize("aggregation, noise, expected", [
    ("plain", 2.0, "needs aggregation = \\\"secagg\\\""),
    ("secagg", 0.3, "cannot be accounted"),
])
def test_site_level_dp_that_cannot_work_is_refused_before_training(tmp_path, aggregation, noise, expected):
    from test_federation_cli_run import securefed

    config = tmp_path / "site-dp.toml"
    config.write_text(SITE_DP_RUN.format(aggregation=aggregation, noise=noise))
    done = securefed("run", str(config), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2 and expected.replace("\\", "") in done.stderr, done.stderr
    assert not (tmp_path / "run" / "sites").exists()


def test_an_inflated_survivor_list_shown_to_one_site_cannot_lower_its_charge(tmp_path):
    """Attack: the coordinator discards one site's masked input, shows the victim a survivor list
    that still names it (more noise than the sum holds) and shows everyone else the truth. The
    victim settles only after the unmask stage has certified the list, which never comes."""
    from securefed.federation.messages import ProtocolRelay, decode_federation_message
    from securefed.secagg.messages import SurvivorList, decode_message

    victim, discarded = "h0", "h5"

    class LyingCoordinatorTransport:
        def __init__(self, inner):
            self.inner, self.exchanges = inner, 0

        def exchange(self, outgoing):
            self.exchanges += 1
            outgoing = dict(outgoing)
            if self.exchanges == 4 and victim in outgoing:  # the consistency check's survivor list
                relay = decode_federation_message(outgoing[victim])
                shown = decode_message(relay.payload)
                assert isinstance(shown, SurvivorList)
                inflated = SurvivorList(round_id=shown.round_id, config_digest=shown.config_digest,
                                        survivors=tuple(sorted({*shown.survivors, 5})))
                outgoing[victim] = ProtocolRelay(relay.protocol_round, inflated.encode()).encode()
            replies = self.inner.exchange(outgoing)
            if self.exchanges >= 3:
                replies.pop(discarded, None)
            return replies

        def close(self):
            self.inner.close()

    fed = small_federation(tmp_path, n=6, length=LENGTH, site_dp=_site_dp(), transport_wrapper=LyingCoordinatorTransport)
    outcome = _run(fed)
    assert outcome.mean_update is not None and victim in outcome.survivors and len(outcome.survivors) == 5
    victim_entries = _entries(fed, victim)
    assert [e.kind for e in victim_entries] == [EntryKind.CHARGE]  # the worst case stands
    assert victim_entries[0].event.sites == fed.coordinator.policy.resolve(6)[1] < 5
    for name in ("h1", "h2", "h3", "h4"):  # the honest view: settled to the 5 sites really summed
        assert _entries(fed, name)[1].event.sites == 5
