"""Scripted malicious-coordinator behaviours, played against honest clients.

For research and for the test suite: each attack is a coordinator that deviates from the
protocol in one documented way. :func:`run` plays it and reports whether the honest clients
refused (detected it and aborted) and whether the coordinator could recover any single site's
input, decided by actually trying: from everything it received, every share it was given and
every key it forged, it reconstructs what it can and unmasks each site's upload.

``run(..., enforce_checks=False)`` plays the same attack against clients that trust the
coordinator (as Flower 1.42's do), which shows what each client check prevents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from securefed.errors import ConfigError, ProtocolAbort, ReconstructionError
from securefed.primitives.keys import agree
from securefed.primitives.prg import MaskAccumulator
from securefed.primitives.randomness import RandomSource, SeededRandom, SystemRandom
from securefed.primitives.shamir import reconstruct_secret
from securefed.secagg.attack_coordinators import (
    _ClaimSurvivorDropped,
    _CoordinatorBase,
    _InconsistentSurvivorLists,
    _IsolateInSparseGraph,
    _Knowledge,
    _LowerThreshold,
    _PrimingRun,
    _ReplayEarlierRound,
    _RequestBothShares,
    _RerunSameRound,
    _SubstitutePublicKey,
)
from securefed.secagg.client import SecAggClient
from securefed.secagg.config import RoundConfig, SecAggConfig
from securefed.secagg.masking import pairwise_seed
from securefed.secagg.messages import KeyAdvertisement, MaskedInput, UnmaskShares, decode_message
from securefed.secagg.recipes import _as_matrix, _Simulation, simulated_federation

__all__ = ["names", "describe", "run", "AttackOutcome"]


@dataclass(frozen=True)
class AttackOutcome:
    name: str
    refused: bool  # at least one honest client detected the deviation and aborted
    leaked: bool  # the coordinator recovered at least one site's input
    leaked_sites: tuple[int, ...]
    refusals: dict[int, str]  # site -> the reason it gave
    round_completed: bool


_ATTACKS: dict[str, tuple[type[_CoordinatorBase], str]] = {
    "request-both-shares": (_RequestBothShares, _RequestBothShares.__doc__ or ""),
    "substitute-public-key": (_SubstitutePublicKey, _SubstitutePublicKey.__doc__ or ""),
    "inconsistent-survivor-lists": (_InconsistentSurvivorLists, _InconsistentSurvivorLists.__doc__ or ""),
    "lower-threshold": (_LowerThreshold, _LowerThreshold.__doc__ or ""),
    "replay-earlier-round": (_ReplayEarlierRound, _ReplayEarlierRound.__doc__ or ""),
    "claim-survivor-dropped": (_ClaimSurvivorDropped, _ClaimSurvivorDropped.__doc__ or ""),
    "isolate-in-sparse-graph": (_IsolateInSparseGraph, _IsolateInSparseGraph.__doc__ or ""),
    "rerun-same-round": (_RerunSameRound, _RerunSameRound.__doc__ or ""),
}


def names() -> list[str]:
    """The scripted attacks, by name."""
    return list(_ATTACKS)


def describe(name: str) -> str:
    return " ".join(_lookup(name)[1].split())


def _lookup(name: str) -> tuple[type[_CoordinatorBase], str]:
    try:
        return _ATTACKS[name]
    except KeyError:
        raise ConfigError(f"unknown attack {name!r}; choose one of: {', '.join(_ATTACKS)}") from None


# --------------------------------------------------------------------------- the leak check
def _recover_inputs(view_messages: Sequence[bytes], config: RoundConfig, knowledge: _Knowledge) -> dict[int, np.ndarray]:
    """Every site input the coordinator can unmask from what it holds (decoded ``w * x``)."""
    uploads: dict[int, np.ndarray] = {}
    ads: dict[int, KeyAdvertisement] = {}
    shares = {"mask": {}, "key": {}}  # type: dict[str, dict[int, dict[int, bytes]]]
    for kind in ("mask", "key"):
        for owner, got in knowledge.extra_shares[kind].items():
            shares[kind].setdefault(owner, {}).update(got)
    for data in view_messages:
        m = decode_message(data)
        if isinstance(m, MaskedInput):
            uploads[m.sender] = m.values
        elif isinstance(m, KeyAdvertisement):
            ads[m.sender] = m
        elif isinstance(m, UnmaskShares):
            for item in m.self_mask_shares:
                shares["mask"].setdefault(item.owner, {})[m.sender + 1] = item.share
            for item in m.key_shares:
                shares["key"].setdefault(item.owner, {})[m.sender + 1] = item.share

    def secret_of(kind: str, owner: int) -> bytes | None:
        got = shares[kind].get(owner, {})
        if len(got) < config.threshold:
            return None
        try:
            return reconstruct_secret(got, threshold=config.threshold)
        except ReconstructionError:
            return None

    recovered = {}
    for site, values in uploads.items():
        self_seed = secret_of("mask", site)
        if self_seed is None:
            continue
        own_key = secret_of("key", site)
        acc = MaskAccumulator(values.size, dtype=values.dtype)
        acc.add_array(values)
        acc.subtract(self_seed)
        complete = True
        for peer in knowledge.masked_with.get(site, frozenset()):
            forged = knowledge.forged_masking.get((site, peer))
            if forged is not None and site in ads:
                shared = agree(forged, ads[site].masking_key)
            elif own_key is not None and peer in ads:
                shared = agree(own_key, ads[peer].masking_key)
            elif (peer_key := secret_of("key", peer)) is not None and site in ads:
                shared = agree(peer_key, ads[site].masking_key)
            else:
                complete = False
                break
            seed = pairwise_seed(shared, digest=config.digest, a=site, b=peer)
            (acc.subtract if site < peer else acc.add)(seed)
        if complete:
            recovered[site] = config.value_codec().decode(acc.values[:-1])
    return recovered


# --------------------------------------------------------------------------- the driver
def run(
    name: str,
    vectors: Sequence[np.ndarray] | np.ndarray,
    config: SecAggConfig = SecAggConfig(),
    seed: int | bytes | str | None = None,
    *,
    target: int = 0,
    enforce_checks: bool = True,
    persist_rounds: bool = True,
) -> AttackOutcome:
    """Play attack ``name`` against honest clients holding ``vectors``; see :class:`AttackOutcome`.

    ``enforce_checks=False`` gives clients that trust the coordinator; ``persist_rounds=False``
    gives clients that keep every check but forget which round ids they started (research
    only: it shows why a deployment must persist them).
    """
    server_cls, _ = _lookup(name)
    arrays, length = _as_matrix(vectors)
    n = len(arrays)
    if not 0 <= target < n:
        raise ConfigError(f"target {target} is not a site index (0..{n - 1})")
    rng: RandomSource = SeededRandom(seed) if seed is not None else SystemRandom()
    fork: Callable[[str], RandomSource] = (lambda l: rng.fork(l)) if isinstance(rng, SeededRandom) else (lambda l: rng)
    identities, roster = simulated_federation(n, fork("identities"))

    def play(
        round_id: int, cls: type[_CoordinatorBase], knowledge: _Knowledge, previous: int | None, run: str = "main"
    ) -> tuple[_Simulation, _CoordinatorBase, RoundConfig]:
        round_config = config.round_config(
            n_sites=n, vector_length=length, round_id=round_id, roster_digest=roster.digest(),
            graph_seed=fork(f"graph-{round_id}").random_bytes(32),
        )
        server = cls(round_config, roster, knowledge, fork(f"coordinator-{round_id}-{run}"))
        server.target = target
        clients = {
            i: SecAggClient(identity=identities[i], roster=roster, vector=arrays[i], rng=fork(f"site-{i}-{round_id}-{run}"),
                            previous_round=previous, policy=config if enforce_checks else None,
                            enforce_checks=enforce_checks)
            for i in range(n)
        }
        sim = _Simulation(server, clients, vanish={}, keep_messages=True, workers=1)
        return sim, server, round_config

    knowledge = _Knowledge()
    round_id, previous = 1, None
    if server_cls is _RerunSameRound:
        priming, _, _ = play(1, _PrimingRun, knowledge, None, run="priming")
        try:
            priming.run()
        except ProtocolAbort:
            pass
        # A site that persists the round ids it started refuses the re-run; one that trusts the
        # coordinator (enforce_checks=False) takes part again.
        previous = 1 if enforce_checks and persist_rounds else None
    elif server_cls is _ReplayEarlierRound:
        first, _, _ = play(1, _CoordinatorBase, _Knowledge(), None)
        first.run()
        earlier = {}
        for m in first.view.messages:
            msg = decode_message(m.data or b"")
            if isinstance(msg, KeyAdvertisement):
                earlier[msg.sender] = msg
        server_cls = type("_Replay", (_ReplayEarlierRound,), {"earlier": earlier})
        round_id, previous = 2, 1
    sim, server, round_config = play(round_id, server_cls, knowledge, previous)
    completed = True
    try:
        sim.run()
    except ProtocolAbort:
        completed = False
    recovered = _recover_inputs([m.data for m in sim.view.messages if m.data is not None], round_config, knowledge)
    tolerance = 2.0 / round_config.scale + 1e-12
    leaked = tuple(
        sorted(
            site for site, values in recovered.items()
            if np.allclose(values, np.clip(arrays[site], -round_config.clip, round_config.clip), atol=tolerance, rtol=0)
        )
    )
    refusals = {site: str(exc) for site, exc in sorted(sim.client_errors.items())}
    return AttackOutcome(
        name=name, refused=bool(refusals), leaked=bool(leaked), leaked_sites=leaked,
        refusals=refusals, round_completed=completed and not refusals,
    )
