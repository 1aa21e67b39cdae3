"""Sites in worker processes (``[federation] workers = N``): the same run, no site in the coordinator.

Worker processes are spawned (they import torch afresh), so this file keeps to a few small runs.
"""

from __future__ import annotations

import gc
import multiprocessing

import numpy as np
import pytest

from securefed.federation import Federation, parse_config
from securefed.federation.messages import Acknowledgement, ModelRelease, decode_federation_message
from securefed.federation.setup import SiteRecipe, make_identities
from securefed.federation.site import FederationSite


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(workers: int):
    return parse_config({"federation": {"rounds": 2, "sites": 3, "seed": 5, "workers": workers},
                         "model": {"name": "mlp", "hidden": [8]}})


def _sites_in_this_process() -> int:
    gc.collect()  # sites of earlier tests, left in unreachable cycles, are not this run's
    # type() rather than isinstance(): some objects (lazy modules, proxies) compute __class__.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), FederationSite))


def test_a_workers_run_matches_the_in_process_run_and_keeps_sites_out_of_the_coordinator(tmp_path):
    in_process_sites: list[int] = []
    local = Federation(_config(0), run_dir=tmp_path / "local").run(
        on_round=lambda record: in_process_sites.append(_sites_in_this_process()))
    assert in_process_sites == [3, 3]  # the check below can see sites when they are here

    worker_sites: list[int] = []
    remote = Federation(_config(2), run_dir=tmp_path / "workers").run(
        on_round=lambda record: worker_sites.append(_sites_in_this_process()))
    assert worker_sites == [0, 0], "a site object exists in the coordinator's process"

    assert [(r.round, r.cohort, r.survivors, r.failure) for r in remote.rounds] == \
        [(r.round, r.cohort, r.survivors, r.failure) for r in local.rounds]
    # The same sites trained the same rounds; workers sum on one thread, so float rounding may differ.
    np.testing.assert_allclose(remote.model, local.model, rtol=0, atol=1e-6)
    for name in ("site-1", "site-2", "site-3"):
        assert remote.sites[name].epsilon == pytest.approx(local.sites[name].epsilon, rel=1e-12)
        assert remote.sites[name].rounds_trained == 2
        assert (remote.run_dir / "sites" / name / "ledger.sqlite").is_file()
    assert remote.final_metrics == pytest.approx(local.final_metrics, abs=1e-4)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("securefed-sites-")]


def test_a_worker_that_dies_takes_only_its_sites_and_the_transport_says_why(tmp_path):
    from securefed.federation.workers import WorkerProcessTransport

    config = _config(2)
    names = config.site_names()
    run_dir = tmp_path / "run"
    roster = make_identities(run_dir, names, config.federation.seed)
    recipes = [SiteRecipe(config=config, name=name, run_dir=run_dir) for name in names]
    transport = WorkerProcessTransport(recipes, roster=roster, workers=2)
    try:
        workers = {p.name: p for p in multiprocessing.active_children() if p.name.startswith("securefed-sites-")}
        assert sorted(workers) == ["securefed-sites-0", "securefed-sites-1"]
        # Sites go to workers round-robin: site-1 and site-3 in worker 0, site-2 in worker 1.
        victim = workers["securefed-sites-1"]
        victim.kill()
        victim.join(timeout=30)
        assert not victim.is_alive()

        release = ModelRelease(0, np.zeros(4, dtype=np.float32)).encode()
        replies = transport.exchange({name: release for name in names})
        assert sorted(replies) == ["site-1", "site-3"]
        assert all(isinstance(decode_federation_message(r), Acknowledgement) for r in replies.values())
        assert "site-2" in transport.errors and "worker process" in transport.errors["site-2"]
        assert "site-1" not in transport.errors and "site-3" not in transport.errors

        again = transport.exchange({name: release for name in names})  # still going, still without it
        assert sorted(again) == ["site-1", "site-3"]
        with pytest.raises(KeyError, match="no site named"):
            transport.exchange({"site-9": release})
    finally:
        transport.close()
    assert not workers["securefed-sites-0"].is_alive()


def test_workers_that_cannot_build_their_sites_stop_the_run_with_the_reason(tmp_path):
    from securefed.errors import ProtocolAbort
    from securefed.federation.workers import WorkerProcessTransport

    config = _config(2)
    names = config.site_names()
    run_dir = tmp_path / "run"
    roster = make_identities(run_dir, names, config.federation.seed)
    (run_dir / "sites" / "site-2" / "identity.key").unlink()  # site-2's worker cannot load its keys
    recipes = [SiteRecipe(config=config, name=name, run_dir=run_dir) for name in names]
    with pytest.raises(ProtocolAbort, match="worker 1: .*identity.key"):
        WorkerProcessTransport(recipes, roster=roster, workers=2)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("securefed-sites-")]
