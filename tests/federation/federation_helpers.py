"""A small federation without torch: real sites, coordinator and transport; numpy learners."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from securefed.errors import PrivacyBudgetExceeded
from securefed.federation.coordinator import Coordinator
from securefed.federation.site import FederationSite
from securefed.federation.transport import InProcessTransport, RecordingTransport
from securefed.federation.workspace import SiteWorkspace
from securefed.primitives.keys import Roster, SiteIdentity
from securefed.primitives.randomness import SeededRandom
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger
from securefed.secagg.config import SecAggConfig


@dataclass(frozen=True)
class Update:
    update: np.ndarray


@dataclass
class NumpyLearner:
    """Moves the model a fixed fraction towards this site's private target vector."""

    target: np.ndarray
    budget_rounds: int = 100
    calls: list[tuple[str, bool]] = field(default_factory=list)

    def train_round(self, global_vector, *, round_id, replay_charged=False):
        self.calls.append((round_id, replay_charged))
        if len([c for c in self.calls if not c[1]]) > self.budget_rounds:
            raise PrivacyBudgetExceeded("test budget")
        return Update(((self.target - global_vector) * 0.5).astype(np.float32))

    def parameter_count(self) -> int:
        return self.target.size

    def evaluate(self, vector, data):
        return {"distance": float(np.linalg.norm(vector - self.target))}


@dataclass
class SmallFederation:
    sites: dict[str, FederationSite]
    learners: dict[str, NumpyLearner]
    roster: Roster
    recorder: RecordingTransport
    coordinator: Coordinator


def small_federation(tmp_path, *, n: int = 5, length: int = 40, aggregation: str = "secagg", seed: int = 0,
                     transport_wrapper=None, budget_rounds: int = 100, site_dp=None,
                     ledger_epsilon: float = 50.0) -> SmallFederation:
    rng = SeededRandom(f"test-federation/{seed}")
    identities = [SiteIdentity.generate(f"h{i}", rng=rng.fork(f"id/{i}")) for i in range(n)]
    roster = Roster([i.public() for i in identities])
    data_rng = np.random.default_rng(seed)
    policy = SecAggConfig(neighbors=None)
    learners, sites = {}, {}
    for identity in identities:
        learner = NumpyLearner(data_rng.normal(0, 0.2, length).astype(np.float32), budget_rounds=budget_rounds)
        workspace = SiteWorkspace(tmp_path / identity.name)
        workspace.create()
        ledger = None
        if site_dp is not None:  # site-level DP needs each site's ledger
            ledger = PrivacyLedger.create(workspace.ledger_file, identity=identity,
                                          budget=PrivacyBudget(epsilon=ledger_epsilon, delta=1e-5))
        learners[identity.name] = learner
        sites[identity.name] = FederationSite(
            identity=identity, roster=roster, aggregation=aggregation, policy=policy, workspace=workspace,
            learner=lambda learner=learner: learner, validation=[0], rng=rng.fork(f"site/{identity.name}"),
            ledger=ledger, site_dp=site_dp)
    inner = InProcessTransport(sites)
    if transport_wrapper is not None:
        inner = transport_wrapper(inner)
    recorder = RecordingTransport(inner, keep_payloads=True)
    coordinator = Coordinator(roster=roster, transport=recorder, aggregation=aggregation, policy=policy,
                              site_dp=site_dp)
    return SmallFederation(sites, learners, roster, recorder, coordinator)
