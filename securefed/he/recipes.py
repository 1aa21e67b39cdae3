"""``encrypted_sum``: homomorphic-encryption aggregation in one process, for notebooks and tests.

A dealer site makes a fresh CKKS key for the call and delivers it sealed and signed to every site
(:mod:`securefed.he.keys`); the coordinator gets only the public context. Each site encrypts
``weight * x`` followed by its weight, signs its upload, and the coordinator adds what verifies
(:mod:`securefed.he.aggregator`); a site decrypts the total. Everything crosses as bytes and the
coordinator's inbox is recorded in ``coordinator_view``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from securefed.errors import ConfigError, ProtocolError
from securefed.he.aggregator import HEAggregator
from securefed.he.config import HEConfig
from securefed.he.keys import RUN_ID_SIZE, SealedContext, context_digest, key_id, open_context, seal_context
from securefed.he.messages import EncryptedUpload
from securefed.primitives.keys import Roster, SiteIdentity
from securefed.primitives.randomness import SeededRandom

__all__ = ["encrypted_sum", "EncryptedSumResult", "HECoordinatorView"]


@dataclass
class HECoordinatorView:
    """Everything the coordinator received: the public context and each site's upload (bytes)."""

    public_context: bytes = b""
    uploads: dict[int, bytes] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)

    @property
    def bytes_per_site(self) -> dict[int, int]:
        return {site: len(data) for site, data in self.uploads.items()}


@dataclass(frozen=True, eq=False)
class EncryptedSumResult:
    total: np.ndarray  # float64: the weighted sum of the survivors' vectors
    total_weight: float
    survivors: set[int]
    coordinator_view: HECoordinatorView
    config: HEConfig

    @property
    def mean(self) -> np.ndarray:
        if self.total_weight <= 0:
            raise ConfigError("the surviving sites' weights sum to zero; there is no mean")
        return self.total / self.total_weight


def _check(vectors: Sequence[np.ndarray] | np.ndarray, weights: Sequence[float] | None,
           config: HEConfig) -> tuple[list[np.ndarray], list[float]]:
    rows = [np.asarray(v, dtype=np.float64).reshape(-1) for v in vectors]
    problems = []
    if len(rows) < 1:
        problems.append("give at least one vector")
    if len({r.size for r in rows}) > 1:
        problems.append("the vectors have different lengths; every site must send the same length")
    if len(rows) > config.max_sites:
        problems.append(f"{len(rows)} vectors exceed max_sites={config.max_sites} of the HE config")
    w = [1.0] * len(rows) if weights is None else [float(x) for x in weights]
    if len(w) != len(rows):
        problems.append(f"{len(w)} weights for {len(rows)} vectors")
    elif any(not 0 <= x <= config.max_weight for x in w):
        problems.append(f"weights must lie in [0, max_weight={config.max_weight:g}]")
    if any(not np.isfinite(r).all() for r in rows):
        problems.append("a vector holds NaN or infinite values")
    if problems:
        raise ConfigError(problems)
    return rows, w


def encrypted_sum(vectors: Sequence[np.ndarray] | np.ndarray, config: HEConfig = HEConfig(), *,
                  weights: Sequence[float] | None = None, dropouts: Iterable[int] = (),
                  seed: int | bytes | str | None = None) -> EncryptedSumResult:
    """Sum ``vectors`` (one per simulated site) under CKKS; the coordinator never holds the key.

    ``weights`` (default 1 each, at most ``config.max_weight``) weight each site's vector;
    ``dropouts`` lists sites that never upload. ``seed`` fixes the sites' identities and the run id
    (CKKS encryption itself draws from TenSEAL's own randomness, so ciphertexts always differ).
    """
    from securefed.he.tenseal_ckks import CKKSCodec, new_context

    if not isinstance(config, HEConfig):
        raise ConfigError(f"config must be an HEConfig, got {type(config).__name__}")
    rows, w = _check(vectors, weights, config)
    rng = SeededRandom(seed) if seed is not None else None
    identities = [SiteIdentity.generate(f"site-{i}", rng.fork(f"site-{i}") if rng else None) for i in range(len(rows))]
    roster = Roster([i.public() for i in identities])
    run_id = rng.fork("run-id").random_bytes(RUN_ID_SIZE) if rng else os.urandom(RUN_ID_SIZE)

    dealer = identities[0]  # the dealer is one of the sites: the coordinator never sees the key
    secret, public = new_context(config)
    deliveries = {name: d.encode() for name, d in seal_context(dealer=dealer, roster=roster, secret_context=secret,
                                                               public_context=public, run_id=run_id).items()}
    secret_digest = context_digest(secret)
    del secret
    view = HECoordinatorView(public_context=public)
    public_digest = context_digest(public)
    digest = key_id(run_id, secret_digest, public_digest)  # what uploads name the key by
    length = rows[0].size + 1  # the weight rides in the last slot
    aggregator = HEAggregator(roster=roster, round_id=1, participants=range(len(rows)), context_digest=digest,
                              length=length, ciphertexts=config.ciphertexts_for(length))
    gone = set(dropouts)
    codecs = {}
    for i, identity in enumerate(identities):
        own = open_context(SealedContext.decode(deliveries[identity.name]), identity=identity, roster=roster,
                           dealer=dealer.name, run_id=run_id, public_digest=public_digest)
        codecs[i] = CKKSCodec(config, own)
        if i in gone:
            continue
        ciphertexts = codecs[i].encrypt(rows[i], weight=w[i], append_weight=True)  # w * clip(x), then w
        upload = EncryptedUpload(1, i, digest, length, tuple(ciphertexts))
        data = EncryptedUpload(upload.round_id, i, digest, length, upload.ciphertexts,
                               identity.sign(upload.statement())).encode()
        view.uploads[i] = data
        try:
            aggregator.receive(data, from_site=i)
        except ProtocolError:
            pass
    coordinator = CKKSCodec(config, public)
    result = aggregator.finish(coordinator.add)
    view.rejected = dict(result.rejected)
    reader = min(result.survivors)
    values = codecs[reader].decrypt(result.ciphertexts, length=length)
    return EncryptedSumResult(total=values[:-1], total_weight=float(values[-1]), survivors=set(result.survivors),
                              coordinator_view=view, config=config)
