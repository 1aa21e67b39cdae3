"""Replaying a charged round after a crash: same charge, same batches, same noise, no new spend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from securefed.errors import ConfigError, PrivacyError
from securefed.primitives.identity import SiteIdentity
from securefed.privacy.dpsgd import make_private
from securefed.privacy.dpsgd_config import DPSGDConfig
from securefed.privacy.ledger import PrivacyBudget, PrivacyLedger

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss(reduction="none")


def _dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def _training(ledger: PrivacyLedger, *, seed: object = 7, noise: float = 1.0):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    config = DPSGDConfig(max_grad_norm=1.0, delta=1e-3, batch_size=8, noise_multiplier=noise,
                         steps_per_round=3, clipping="per-sample")
    return model, make_private(model, lambda p: torch.optim.SGD(p, lr=0.5), _dataset(), config=config,
                               ledger=ledger, seed=seed)


@pytest.fixture()
def ledger_path(tmp_path):
    return tmp_path / "site.sqlite"


def _ledger(path, identity):
    return PrivacyLedger.open_or_create(path, identity=identity, budget=PrivacyBudget(epsilon=50.0, delta=1e-3))


def test_replay_reuses_the_charge_and_reproduces_the_release(ledger_path):
    identity = SiteIdentity.generate("site-a")
    ledger = _ledger(ledger_path, identity)
    model, training = _training(ledger)
    training.train_round(CE, round_id="r1")
    first = [p.detach().clone() for p in model.parameters()]
    spent, entries = ledger.spent().epsilon, len(ledger.entries())
    training.close()
    ledger.close()

    # A "restarted" site: fresh objects, the same starting model, the same ledger file.
    ledger = _ledger(ledger_path, identity)
    model, training = _training(ledger)
    with pytest.raises(ConfigError, match="already holds a DP-SGD charge"):
        training.train_round(CE, round_id="r1")
    report = training.train_round(CE, round_id="r1", replay_charged=True)
    assert len(ledger.entries()) == entries and ledger.spent().epsilon == spent
    assert report.ledger_entry.round_id == "r1"
    for before, after in zip(first, model.parameters()):
        assert torch.equal(before, after.detach())
    # A round never charged is charged as usual, replay flag or not.
    training.train_round(CE, round_id="r2", replay_charged=True)
    assert len(ledger.entries()) == entries + 1 and ledger.spent().epsilon > spent


def test_replay_without_a_seed_is_refused(ledger_path):
    ledger = _ledger(ledger_path, SiteIdentity.generate("site-a"))
    _, training = _training(ledger, seed=None)
    with pytest.raises(ConfigError, match="needs a seed"):
        training.train_round(CE, round_id="r1", replay_charged=True)
    assert len(ledger.entries()) == 1  # the genesis entry only


def test_replay_of_a_different_mechanism_is_refused(ledger_path):
    identity = SiteIdentity.generate("site-a")
    ledger = _ledger(ledger_path, identity)
    _, training = _training(ledger, noise=1.0)
    training.train_round(CE, round_id="r1")
    training.close()
    _, training = _training(ledger, noise=2.0)
    with pytest.raises(PrivacyError, match="cannot be replayed"):
        training.train_round(CE, round_id="r1", replay_charged=True)
