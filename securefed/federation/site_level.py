"""Site-level distributed DP in a federated round: the parameters every party derives alike.

Sites and coordinator each build the same :class:`~securefed.privacy.DistributedDPEncoder` from
public facts only (the model size, the round's cohort size and threshold, the ring's bit width,
the ``[site_dp]`` settings), so they agree on the grid without exchanging it; the round's shared
rotation is seeded by the digest of the round configuration every site signs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SiteLevelDP", "rotation_seed", "SITE_DP_NOTE"]

SITE_DP_NOTE = "site-level distributed DP"


def rotation_seed(config_digest: bytes) -> bytes:
    """The public seed of a round's random rotation, bound to the round configuration."""
    return hashlib.sha256(b"securefed/site-dp/rotation/" + config_digest).digest()


@dataclass(frozen=True)
class SiteLevelDP:
    """The federation's ``[site_dp]`` settings plus the ring; builds (and caches) encoders."""

    l2_clip: float
    noise_multiplier: float
    bit_width: int
    _cache: dict[tuple[int, int, int], Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: Any) -> SiteLevelDP | None:
        """From a FederationConfig; None when site-level DP is off."""
        if not config.site_dp.enabled:
            return None
        return cls(config.site_dp.l2_clip, config.site_dp.noise_multiplier, config.secagg.bit_width)

    def encoder(self, *, dimension: int, cohort: int, threshold: int) -> Any:
        """The encoder for an update of ``dimension`` values summed among ``cohort`` sites, at least
        ``threshold`` of them (ConfigError when no grid fits the ring)."""
        key = (dimension, cohort, threshold)
        if key not in self._cache:
            from securefed.privacy.distributed import DistributedDPConfig, DistributedDPEncoder

            config = DistributedDPConfig(l2_clip=self.l2_clip, noise_multiplier=self.noise_multiplier,
                                         expected_sites=cohort, min_sites=threshold, bit_width=self.bit_width)
            self._cache[key] = DistributedDPEncoder(config, dimension=dimension)
        return self._cache[key]
