"""Integer sums under CKKS (site-level DP's noised ring elements): exact after rounding."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.errors import ConfigError
from securefed.he.config import HEConfig
from securefed.he.tenseal_ckks import CKKSCodec, new_context


@pytest.mark.parametrize("sites", [2, 10])
def test_ring_elements_sum_exactly_modulo_the_ring(sites):
    config = HEConfig(max_sites=sites).for_integers(32)
    secret, public = new_context(config)
    site, coordinator = CKKSCodec(config, secret), CKKSCodec(config, public)
    rng = np.random.default_rng(sites)
    ring = rng.integers(0, 2**32, (sites, 3000), dtype=np.uint64).astype(np.uint32)
    ring[0, :10] = [0, 2**31 - 1, 2**31, 2**32 - 1, 1, 2**31 + 1, 2**30, 3 * 2**30, 7, 2**32 - 7]  # the edges
    uploads = [site.encrypt(r.view(np.int32).astype(np.float64), append_weight=True) for r in ring]
    values = site.decrypt(coordinator.add(uploads), length=3001)
    assert np.abs(values - np.rint(values)).max() < 0.1  # far from a rounding boundary
    summed = np.rint(values[:-1]).astype(np.int64).astype(np.uint64).astype(np.uint32)
    assert np.array_equal(summed, ring.sum(axis=0, dtype=np.uint64).astype(np.uint32))
    assert values[-1] == pytest.approx(sites, abs=0.1)


def test_integer_sums_refuse_a_ring_the_modulus_cannot_hold():
    assert HEConfig(max_sites=100).for_integers(32).scale_bits >= 16
    with pytest.raises(ConfigError, match="bit_width = 32"):
        HEConfig().for_integers(64)
