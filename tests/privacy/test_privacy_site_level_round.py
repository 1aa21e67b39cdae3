"""Site-level distributed DP through real secure aggregation, with every site's ledger.

The flow a federation runs each round: every site charges its ledger for the worst case the
protocol allows (only ``threshold`` sites' noise in the sum) *before* touching its update,
encodes with the distributed discrete Gaussian, and masks; the coordinator sums; after the round
each site settles its charge with the noise actually in the sum (the survivors), which the ledger
accepts only between the worst case charged and the cohort that started the round.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from securefed.errors import ConfigError, PrivacyBudgetExceeded
from securefed.primitives.identity import SiteIdentity
from securefed.primitives.randomness import SeededRandom
from securefed.privacy import (
    DistributedDPConfig,
    DistributedDPEncoder,
    PrivacyBudget,
    PrivacyLedger,
    compose_epsilon,
    verify_ledger_file,
)
from securefed.secagg import SecAggConfig, secure_modular_sum

SITES = 6
DIMENSION = 300
ROUND_SEED = bytes(range(32))


def _federation(tmp_path, budget_epsilon: float):
    secagg = SecAggConfig(bit_width=32)
    _, threshold = secagg.resolve(SITES)
    config = DistributedDPConfig(l2_clip=1.0, noise_multiplier=0.7, expected_sites=SITES, min_sites=threshold)
    encoder = DistributedDPEncoder(config, dimension=DIMENSION)
    identities = [SiteIdentity.generate(f"site-{i}", SeededRandom(f"id-{i}")) for i in range(SITES)]
    ledgers = [
        PrivacyLedger.create(tmp_path / f"site-{i}.sqlite", identity=identities[i],
                             budget=PrivacyBudget(epsilon=budget_epsilon, delta=1e-5))
        for i in range(SITES)
    ]
    return secagg, threshold, encoder, identities, ledgers


def test_round_with_dropouts_charges_worst_case_then_settles_the_noise_in_the_sum(tmp_path) -> None:
    secagg, threshold, encoder, identities, ledgers = _federation(tmp_path, budget_epsilon=10.0)
    updates = np.random.default_rng(0).normal(0, 0.05, size=(SITES, DIMENSION))
    # The cohort (every site that starts the round) bounds any later settle.
    worst = encoder.event(sites=threshold)
    assert worst.cohort == SITES
    charges = [ledger.charge(worst, round_id="1", note="distributed DP, worst case") for ledger in ledgers]
    encoded = np.stack([
        encoder.encode(update, round_seed=ROUND_SEED, rng=SeededRandom(f"noise-{i}"))
        for i, update in enumerate(updates)
    ])
    result = secure_modular_sum(encoded, secagg, dropouts={"masked_input": [2]}, seed=1)
    assert result.survivors == {0, 1, 3, 4, 5}
    decoded = encoder.decode(result.total, round_seed=ROUND_SEED)

    survivors = len(result.survivors)
    truth = updates[sorted(result.survivors)].sum(axis=0)  # all norms < l2_clip: no clipping
    assert np.max(np.abs(decoded - truth)) <= encoder.error_bound(sites=survivors)
    assert not np.allclose(decoded, truth, atol=1e-6), "the sum must carry noise"

    actual = encoder.event(sites=survivors)
    impossible = dataclasses.replace(actual, sites=SITES + 1, cohort=SITES + 1)
    for ledger, charge in zip(ledgers, charges):
        with pytest.raises(ConfigError, match="cannot settle"):
            ledger.settle(charge.seq, impossible)  # more sites than started the round
        charged = ledger.spent().epsilon
        ledger.settle(charge.seq, actual, note=f"{survivors} sites' noise in the sum")
        settled = ledger.spent().epsilon
        # Survivors >= threshold: more noise than the worst case, so the settled cost is lower,
        # and it is exactly the cost of the noise actually in the sum.
        assert settled < charged
        assert settled == pytest.approx(compose_epsilon([actual], delta=1e-5), rel=1e-12)
    for identity, ledger in zip(identities, ledgers):
        assert verify_ledger_file(ledger.path, identity.public()) == []


def test_a_site_out_of_budget_refuses_before_encoding(tmp_path) -> None:
    secagg, threshold, encoder, _, ledgers = _federation(tmp_path, budget_epsilon=1.0)
    cost = compose_epsilon([encoder.event(sites=threshold)], delta=1e-5)
    assert cost > 1.0, "the test needs a round that does not fit the budget"
    before = [len(ledger.entries()) for ledger in ledgers]
    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        ledgers[0].charge(encoder.event(sites=threshold), round_id="1")
    assert [len(ledger.entries()) for ledger in ledgers] == before
