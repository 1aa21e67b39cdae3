"""Building the parties of an embedded run: identities, roster, workspaces, ledgers, learners.

Shared by the in-process runtime and the worker processes, so a site is built the same way
wherever it runs. Under the embedded runtime every secret (keys, seeds) is derived from the
federation's seed, which makes runs reproducible: a simulation, not a deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securefed.federation.site import FederationSite
from securefed.federation.site_level import SiteLevelDP
from securefed.federation.workspace import SiteWorkspace
from securefed.primitives.keys import Roster, SiteIdentity
from securefed.primitives.randomness import SeededRandom

__all__ = ["SiteRecipe", "federation_random", "make_identities", "build_site", "site_workspace", "trainer_seed"]


def federation_random(seed: int) -> SeededRandom:
    return SeededRandom(f"securefed/federation/seed={seed}")


def site_workspace(run_dir: Path, name: str) -> SiteWorkspace:
    return SiteWorkspace(run_dir / "sites" / name)


def make_identities(run_dir: Path, names: list[str], seed: int) -> Roster:
    """Create (or, on resume, load) every site's identity in its workspace; return the roster."""
    rng = federation_random(seed)
    publics = []
    for name in names:
        workspace = site_workspace(run_dir, name)
        workspace.create()
        if workspace.identity_file.exists():
            identity = SiteIdentity.load(workspace.identity_file)
        else:
            identity = SiteIdentity.generate(name, rng=rng.fork(f"identity/{name}"))
            identity.save(workspace.identity_file)
        workspace.secret_seed(create_from=rng.fork(f"site-seed/{name}").random_bytes(32))
        publics.append(identity.public())
    return Roster(publics)


def trainer_seed(secret_seed: bytes) -> int:
    return int.from_bytes(SeededRandom(secret_seed).fork("training").random_bytes(8), "little") >> 1


@dataclass(frozen=True)
class SiteRecipe:
    """Everything needed to build one site, picklable so a worker process can build it."""

    config: Any  # FederationConfig
    name: str
    run_dir: Path


def build_site(recipe: SiteRecipe, task: Any, roster: Roster) -> FederationSite:
    """Open the site's workspace and ledger; its learner (torch, the model) is built on first use."""
    from securefed.federation.local_training import LocalTrainer
    from securefed.models import build_model
    from securefed.privacy.ledger import PrivacyLedger

    config = recipe.config
    workspace = site_workspace(recipe.run_dir, recipe.name)
    identity = SiteIdentity.load(workspace.identity_file)
    secret = workspace.secret_seed()
    index = [s.name for s in task.sites].index(recipe.name)
    data = task.sites[index]
    training, privacy = config.training_for(recipe.name), config.privacy_for(recipe.name)
    dp = privacy.dpsgd_config(training, config.federation.rounds)
    ledger = None
    if dp is not None:
        budget = privacy.budget_for(config.site(recipe.name))
        ledger = PrivacyLedger.open_or_create(workspace.ledger_file, identity=identity, budget=budget)
        workspace.publish_head(ledger.head().to_dict(), ledger.ledger_id)

    def learner() -> LocalTrainer:
        model = build_model(config.model, task.spec, seed=config.federation.seed)
        return LocalTrainer(model=model, spec=task.spec, train=data.train, settings=training, dp=dp,
                            ledger=ledger, seed=trainer_seed(secret))

    he = None
    if config.federation.aggregation.value == "he":
        from securefed.federation.site_he import SiteHE

        he = SiteHE(identity=identity, roster=roster, workspace=workspace, config=config.he_config(),
                    min_sites=config.he.min_sites, dealer=config.he.dealer_of(config.site_names()),
                    site_dp=SiteLevelDP.from_config(config), cohort=config.cohort_size())
    return FederationSite(identity=identity, roster=roster, aggregation=config.federation.aggregation.value,
                          policy=config.secagg_config(), workspace=workspace, learner=learner,
                          validation=data.val, rng=SeededRandom(secret), ledger=ledger,
                          site_dp=SiteLevelDP.from_config(config), he=he)
