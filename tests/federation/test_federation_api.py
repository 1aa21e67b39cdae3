"""The Python API as a notebook user drives it: ``Federation(config, run_dir=...).run()``.

Each run is tiny (breast-cancer + MLP, or a few small synthetic images + a small U-Net) so the
file stays fast on a laptop CPU. Ledgers are read back as an auditor would: read-only, verified
under the site's public key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from securefed.errors import ConfigError
from securefed.federation import Federation, RoundRecord, default_config, parse_config
from securefed.federation.messages import (
    Acknowledgement,
    PlainUpdate,
    ProtocolRelay,
    RoundStart,
    decode_federation_message,
)
from securefed.primitives.keys import SiteIdentity
from securefed.privacy.ledger import PrivacyLedger
from securefed.privacy.ledger_records import EntryKind

MLP = {"model": {"name": "mlp", "hidden": [8]}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(federation: dict, **sections: dict):
    return parse_config({"federation": federation, **MLP, **sections})


def _run(config, run_dir: Path, **options):
    return Federation(config, run_dir=run_dir).run(**options)


def _ledger(run_dir: Path, site: str) -> tuple[list[str], float, float]:
    """The round ids a site's ledger charged, its spend and its budget (verified, read-only)."""
    workspace = run_dir / "sites" / site
    public = SiteIdentity.load(workspace / "identity.key").public()
    with PrivacyLedger.read(workspace / "ledger.sqlite", public_key=public) as ledger:
        charges = [e.round_id for e in ledger.entries() if e.kind is EntryKind.CHARGE]
        return charges, float(ledger.spent().epsilon), float(ledger.budget.epsilon)


# ------------------------------------------------------------------ the default run
def test_default_config_run_returns_metrics_epsilons_model_and_run_directory(tmp_path):
    config = default_config()
    result = _run(config, tmp_path / "run")
    rounds = config.federation.rounds
    names = config.site_names()
    assert [r.round for r in result.rounds] == list(range(1, rounds + 1))
    for record in result.rounds:
        assert isinstance(record, RoundRecord)
        assert record.survivors == tuple(names) and record.failure is None
        assert 0.0 <= record.metrics["accuracy"] <= 1.0 and np.isfinite(record.metrics["loss"])
    assert result.final_metrics == result.rounds[-1].metrics
    assert result.final_metrics["accuracy"] > 0.6  # better than guessing the majority class (63%)
    target = config.privacy.target_epsilon
    assert set(result.sites) == set(names)
    for name, site in result.sites.items():
        assert 0 < site.epsilon <= target, name
        assert site.epsilon == result.epsilon(name)
        assert site.delta == pytest.approx(config.privacy.delta)
        assert site.rounds_trained == rounds
        assert "accuracy" in site.validation
        charges, spent, budget = _ledger(result.run_dir, name)
        assert charges == [f"round-{r}" for r in range(1, rounds + 1)]
        assert spent == pytest.approx(site.epsilon, rel=1e-12) and budget == target
    assert result.model.dtype == np.float32 and result.model.ndim == 1
    assert result.model.size == result.summary["parameters"] > 0
    assert np.isfinite(result.model).all()
    assert result.run_dir == tmp_path / "run"
    for name in ("run.json", "roster.json", "summary.json", "metrics.jsonl", "model.pt",
                 "coordinator_transcript.json", "checkpoints/LATEST"):
        assert (result.run_dir / name).is_file(), name
    for name in names:
        for file in ("identity.key", "seed.key", "ledger.sqlite", "ledger-head.json", "state.json", "metrics.jsonl"):
            assert (result.run_dir / "sites" / name / file).is_file(), (name, file)
    # The saved model is the returned vector.
    import torch

    saved = torch.load(result.run_dir / "model.pt", weights_only=True)
    np.testing.assert_array_equal(np.concatenate([v.numpy().ravel() for v in saved.values()]), result.model)


def test_a_config_that_is_not_a_federation_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="FederationConfig"):
        Federation({"federation": {"rounds": 1}}, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ reproducibility
def test_the_same_seed_gives_the_same_model_and_metrics_and_another_seed_does_not(tmp_path):
    def run(seed: int, where: str):
        return _run(_config({"rounds": 2, "sites": 3, "seed": seed}), tmp_path / where)

    first, again, other = run(7, "a"), run(7, "b"), run(8, "c")
    assert np.array_equal(first.model, again.model)
    assert [r.metrics for r in first.rounds] == [r.metrics for r in again.rounds]
    assert {n: s.epsilon for n, s in first.sites.items()} == {n: s.epsilon for n, s in again.sites.items()}
    assert not np.array_equal(first.model, other.model)


# ------------------------------------------------------------------ sampled cohorts
def test_sites_per_round_samples_cohorts_and_charges_only_the_sampled_sites(tmp_path):
    result = _run(_config({"rounds": 3, "sites": 6, "sites_per_round": 4, "seed": 1}), tmp_path / "run")
    cohorts = [set(r.cohort) for r in result.rounds]
    assert all(len(c) == 4 for c in cohorts)
    assert len({frozenset(c) for c in cohorts}) > 1, "every round sampled the same cohort"
    for record in result.rounds:
        assert set(record.survivors) == set(record.cohort) and record.failure is None
    for name in (f"site-{i}" for i in range(1, 7)):
        charges, spent, budget = _ledger(result.run_dir, name)
        sampled = [f"round-{r.round}" for r in result.rounds if name in r.cohort]
        assert charges == sampled, name  # no charge for a round the site sat out
        assert result.sites[name].rounds_trained == len(sampled)
        assert spent <= budget


# ------------------------------------------------------------------ what the coordinator receives
def test_plain_aggregation_receives_updates_in_the_clear_and_secagg_only_protocol_messages(tmp_path):
    federation = {"rounds": 1, "sites": 3, "seed": 2}
    plain = _run(_config({**federation, "aggregation": "plain"}), tmp_path / "plain", keep_transcript=True)
    secure = _run(_config({**federation, "aggregation": "secagg"}), tmp_path / "secure", keep_transcript=True)

    # Plain: one PlainUpdate per site, and the model moved by exactly their mean.
    transcript = plain.coordinator_transcript
    received = [decode_federation_message(e.data) for e in transcript.received()]
    updates = {e.site: m.update for e, m in zip(transcript.received(), received) if isinstance(m, PlainUpdate)}
    assert sorted(updates) == ["site-1", "site-2", "site-3"]
    assert plain.transcript["plaintext_updates_received"] == 3
    start = next(decode_federation_message(e.data) for e in transcript.entries
                 if e.direction == "sent" and e.kind == "RoundStart")
    assert isinstance(start, RoundStart)
    mean = np.mean([u.astype(np.float64) for u in updates.values()], axis=0)
    np.testing.assert_allclose(plain.model, start.model + mean, rtol=0, atol=1e-7)

    # Secure aggregation: nothing in the clear, only protocol relays and acknowledgements...
    entries = secure.coordinator_transcript.received()
    assert entries and secure.transcript["plaintext_updates_received"] == 0
    for entry in entries:
        assert entry.kind.startswith("ProtocolRelay/") or entry.kind == "Acknowledgement", entry.kind
        assert isinstance(decode_federation_message(entry.data), (ProtocolRelay, Acknowledgement))
    # ...yet the same sites trained the same updates (same seed), and their mean arrived intact.
    np.testing.assert_allclose(secure.model, plain.model, rtol=0, atol=1e-6)
    # No 32-byte piece of any site's update appears in anything the coordinator received.
    payloads = [e.data for e in entries]
    for site, update in updates.items():
        raw = update.astype("<f4").tobytes()
        for offset in range(0, len(raw) - 31, 32):
            window = raw[offset:offset + 32]
            if len(set(window)) > 1:
                assert not any(window in p for p in payloads), (site, offset)


# ------------------------------------------------------------------ privacy off
def test_privacy_disabled_creates_no_ledgers_and_reports_no_epsilon(tmp_path):
    result = _run(_config({"rounds": 1, "sites": 2}, privacy={"enabled": False}), tmp_path / "run")
    assert result.rounds[0].failure is None and "accuracy" in result.final_metrics
    for name, site in result.sites.items():
        assert site.epsilon is None and site.delta is None and site.budget_epsilon is None
        assert site.ledger_id is None and result.epsilon(name) is None
        assert site.rounds_trained == 1
        assert not list((result.run_dir / "sites" / name).glob("ledger*")), name
    assert all(s["epsilon"] is None for s in result.summary["sites"].values())


# ------------------------------------------------------------------ segmentation
def _segmentation(kind: str, samples: int, size: int) -> object:
    return parse_config({"federation": {"rounds": 1, "sites": 2},
                         "data": {"kind": kind, "samples": samples, "image_size": size},
                         "model": {"name": "unet", "features": [4, 8]}, "training": {"batch_size": 4}})


def test_segmentation_2d_with_a_unet_reports_dice(tmp_path):
    result = _run(_segmentation("synthetic-seg2d", 24, 16), tmp_path / "run")
    assert result.rounds[0].survivors == ("site-1", "site-2")
    assert 0.0 <= result.final_metrics["dice"] <= 1.0 and np.isfinite(result.final_metrics["loss"])
    assert all(0.0 <= s.validation["dice"] <= 1.0 for s in result.sites.values())
    assert all(0 < s.epsilon <= 3.0 for s in result.sites.values())


def test_segmentation_3d_runs_a_round(tmp_path):
    result = _run(_segmentation("synthetic-seg3d", 16, 16), tmp_path / "run")
    assert [r.round for r in result.rounds] == [1]
    assert result.rounds[0].survivors == ("site-1", "site-2") and result.rounds[0].failure is None
    assert 0.0 <= result.final_metrics["dice"] <= 1.0


# ------------------------------------------------------------------ callbacks and progress
def test_on_round_sees_every_round_in_order_and_progress_does_not_break_a_non_terminal(tmp_path, capsys):
    seen: list[RoundRecord] = []
    config = _config({"rounds": 3, "sites": 2}, evaluation={"every": 2})
    result = _run(config, tmp_path / "run", progress=True, on_round=seen.append)
    assert [r.round for r in seen] == [1, 2, 3]
    assert [(r.round, r.cohort, r.survivors, r.metrics) for r in seen] == \
        [(r.round, r.cohort, r.survivors, r.metrics) for r in result.rounds]
    assert seen[0].metrics == {} and "accuracy" in seen[1].metrics and "accuracy" in seen[2].metrics
    assert "federated rounds" in capsys.readouterr().err  # progress goes to stderr


# ------------------------------------------------------------------ budgets
def test_a_site_whose_budget_runs_out_stops_and_the_others_finish(tmp_path):
    from securefed.data import load_task
    from securefed.privacy.accounting import compose_epsilon
    from securefed.privacy.dpsgd_config import plan_training

    def config(budget: float):
        return parse_config({"federation": {"rounds": 3, "seed": 4}, **MLP,
                             "sites": [{"name": "a"}, {"name": "b"}, {"name": "c", "epsilon_budget": budget},
                                       {"name": "d"}],
                             "privacy": {"noise_multiplier": 2.0, "target_epsilon": 10.0}})

    # A budget between the cost of one round and of two, from the site's own data size.
    probe = config(10.0)
    task = load_task(probe.data, sites=probe.site_names(), seed=probe.federation.seed)
    plan = plan_training(probe.privacy.dpsgd_config(probe.training, 3), dataset_size=len(task.sites[2].train))
    one, two = (compose_epsilon([plan.round_event()] * k, delta=plan.delta, accountant=plan.accountant)
                for k in (1, 2))
    budget = (one + two) / 2

    result = _run(config(budget), tmp_path / "run")
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert result.rounds[0].survivors == ("a", "b", "c", "d")
    for record in result.rounds[1:]:
        assert record.refusals == {"c": "privacy budget exhausted"}
        assert record.survivors == ("a", "b", "d") and record.failure is None
        assert record.metrics
    charges, spent, cap = _ledger(result.run_dir, "c")
    assert charges == ["round-1"] and cap == pytest.approx(budget) and spent <= cap
    assert result.sites["c"].epsilon == pytest.approx(one, rel=1e-9)
    assert result.sites["c"].rounds_trained == 1 and result.sites["a"].rounds_trained == 3
    for name in "abd":
        assert _ledger(result.run_dir, name)[0] == ["round-1", "round-2", "round-3"]


# ------------------------------------------------------------------ resume
def test_resume_through_the_api_finishes_an_interrupted_run_and_changes_nothing_after(tmp_path):
    config = _config({"rounds": 2, "sites": 3, "seed": 6})
    reference = _run(config, tmp_path / "reference")

    class Interrupted(Exception):
        pass

    def stop_after_round_one(record: RoundRecord) -> None:
        raise Interrupted(record.round)

    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(config, run_dir, on_round=stop_after_round_one)
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip().startswith("round-0001-")
    assert _ledger(run_dir, "site-1")[0] == ["round-1"]

    resumed = Federation.resume(run_dir).run()
    assert [r.round for r in resumed.rounds] == [1, 2]
    np.testing.assert_allclose(resumed.model, reference.model, rtol=0, atol=1e-6)
    assert resumed.final_metrics == pytest.approx(reference.final_metrics, abs=1e-6)
    for name in config.site_names():
        assert _ledger(run_dir, name)[0] == ["round-1", "round-2"], name
        assert resumed.sites[name].epsilon == pytest.approx(reference.sites[name].epsilon, rel=1e-12)

    # Resuming a finished run trains nothing and charges nothing.
    ledgers = {name: _ledger(run_dir, name) for name in config.site_names()}
    again = Federation.resume(run_dir).run()
    assert np.array_equal(again.model, resumed.model)
    assert [r.to_dict() for r in again.rounds] == [r.to_dict() for r in resumed.rounds]
    assert {name: _ledger(run_dir, name) for name in config.site_names()} == ledgers


def test_resume_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a securefed run directory"):
        Federation.resume(tmp_path)


def test_a_tweaked_default_config_runs(tmp_path):
    config = default_config()
    config = dataclasses.replace(config, federation=dataclasses.replace(config.federation, rounds=1, seed=9))
    result = _run(config, tmp_path / "run")
    assert [r.round for r in result.rounds] == [1]
    assert result.summary["rounds"][0]["survivors"] == config.site_names()
