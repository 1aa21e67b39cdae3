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

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from securefed.errors import ConfigError, DecryptionError, ProtocolAbort, ReconstructionError
from securefed.primitives import aead
from securefed.primitives.keys import AgreementKeyPair, Roster, SiteIdentity, agree
from securefed.primitives.prg import MaskAccumulator
from securefed.primitives.randomness import RandomSource, SeededRandom, SystemRandom
from securefed.primitives.shamir import reconstruct_secret
from securefed.secagg.client import SecAggClient
from securefed.secagg.config import RoundConfig, SecAggConfig
from securefed.secagg.masking import (
    SHARE_BYTES,
    decode_share_plaintext,
    encode_share_plaintext,
    pairwise_seed,
    share_associated_data,
    share_encryption_key,
)
from securefed.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    ShareBundle,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
    survivors_statement,
)
from securefed.secagg.recipes import _as_matrix, _Simulation, simulated_federation
from securefed.secagg.server import SecAggServer
from securefed.secagg.stages import Stage

__all__ = ["names", "describe", "run", "AttackOutcome"]


@dataclass(frozen=True)
class AttackOutcome:
    name: str
    refused: bool  # at least one honest client detected the deviation and aborted
    leaked: bool  # the coordinator recovered at least one site's input
    leaked_sites: tuple[int, ...]
    refusals: dict[int, str]  # site -> the reason it gave
    round_completed: bool


@dataclass
class _Knowledge:
    """What the coordinator holds beyond the messages it received."""

    forged_masking: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (victim, peer) -> secret
    forged_encryption: dict[tuple[int, int], bytes] = field(default_factory=dict)
    masked_with: dict[int, frozenset[int]] = field(default_factory=dict)  # site -> peers it masked against
    extra_shares: dict[str, dict[int, dict[int, bytes]]] = field(
        default_factory=lambda: {"mask": {}, "key": {}}
    )


# --------------------------------------------------------------------------- the attacks
class _CoordinatorBase(SecAggServer):
    """An honest server that also remembers whom each site masked against."""

    target = 0

    def __init__(self, config: RoundConfig, roster: Roster, knowledge: _Knowledge, rng: RandomSource) -> None:
        super().__init__(config, roster)
        self.knowledge = knowledge
        self.rng = rng

    def _close_share_keys(self):  # type: ignore[no-untyped-def]
        out = super()._close_share_keys()
        self.knowledge.masked_with.update(self._delivered)
        return out


class _RequestBothShares(_CoordinatorBase):
    """Asks every holder of the target's shares for its key share too, though it survived."""

    def _close_consistency_check(self):  # type: ignore[no-untyped-def]
        out = super()._close_consistency_check()
        for site, request in out.items():
            if self.target in request.self_mask_ids:
                out[site] = dataclasses.replace(request, key_ids=tuple(sorted({*request.key_ids, self.target})))
        return out


class _SubstitutePublicKey(_CoordinatorBase):
    """Shows the target forged keys for all its neighbours, so every mask it applies is known."""

    def _close_advertise_keys(self):  # type: ignore[no-untyped-def]
        out = super()._close_advertise_keys()
        victim = self.target
        if victim in out:
            forged = []
            for ad in out[victim].entries:
                c, s = AgreementKeyPair.generate(self.rng), AgreementKeyPair.generate(self.rng)
                self.knowledge.forged_encryption[(victim, ad.sender)] = c.secret
                self.knowledge.forged_masking[(victim, ad.sender)] = s.secret
                forged.append(dataclasses.replace(ad, encryption_key=c.public, masking_key=s.public))
            out[victim] = dataclasses.replace(out[victim], entries=tuple(forged))
        return out

    def _close_share_keys(self):  # type: ignore[no-untyped-def]
        victim = self.target
        bundle = self._bundles.get(victim)
        out = super()._close_share_keys()
        if bundle is None or victim not in out:
            return out
        cfg = self.config
        victim_c_pk = self._ads[victim].encryption_key
        # Keep the victim's shares for ourselves (they were encrypted to our forged keys) ...
        for item in bundle.items:
            secret = self.knowledge.forged_encryption.get((victim, item.recipient))
            if secret is None:
                continue
            key = share_encryption_key(agree(secret, victim_c_pk), digest=cfg.digest, a=victim, b=item.recipient)
            ad = share_associated_data(digest=cfg.digest, round_id=cfg.round_id, sender=victim, recipient=item.recipient)
            try:
                _, _, key_share, mask_share = decode_share_plaintext(aead.open_sealed(key, item.ciphertext, associated_data=ad))
            except DecryptionError:
                continue
            self.knowledge.extra_shares["key"].setdefault(victim, {})[item.recipient + 1] = key_share
            self.knowledge.extra_shares["mask"].setdefault(victim, {})[item.recipient + 1] = mask_share
        # ... hide them from its real neighbours, and feed the victim shares we made up.
        for site, delivery in out.items():
            if site != victim:
                out[site] = dataclasses.replace(delivery, items=tuple(i for i in delivery.items if i.sender != victim))
        fabricated = []
        for (v, peer), secret in self.knowledge.forged_encryption.items():
            key = share_encryption_key(agree(secret, victim_c_pk), digest=cfg.digest, a=victim, b=peer)
            ad = share_associated_data(digest=cfg.digest, round_id=cfg.round_id, sender=peer, recipient=victim)
            junk = encode_share_plaintext(peer, victim, self.rng.random_bytes(SHARE_BYTES), self.rng.random_bytes(SHARE_BYTES))
            fabricated.append(EncryptedShare(peer, victim, aead.seal(key, junk, associated_data=ad, rng=self.rng)))
        out[victim] = dataclasses.replace(out[victim], items=tuple(fabricated))
        self._delivered = {s: (d - {victim} if s != victim else frozenset(p for _, p in self.knowledge.forged_encryption))
                           for s, d in self._delivered.items()}
        self.knowledge.masked_with.update(self._delivered)
        return out


class _InconsistentSurvivorLists(_CoordinatorBase):
    """Tells half the sites the target survived and the other half that it dropped."""

    def _close_masked_input(self):  # type: ignore[no-untyped-def]
        out = super()._close_masked_input()
        alive = tuple(sorted(self.u3))
        without = tuple(s for s in alive if s != self.target)
        self._lists = {s: (alive if s % 2 == 0 or s == self.target else without) for s in out}
        return {s: dataclasses.replace(m, survivors=self._lists[s]) for s, m in out.items()}

    def _receive_consistency_check(self, message):  # type: ignore[no-untyped-def]
        self._signatures[message.sender] = message.signature  # accepted unchecked, to be relayed

    def _close_consistency_check(self):  # type: ignore[no-untyped-def]
        signed = frozenset(self._signatures)
        self.u4 = signed
        self._enter(Stage.UNMASK)
        for site in sorted(signed):
            shown = set(self._lists[site])
            held = self._delivered[site] | {site}
            self._requests[site] = UnmaskRequest(
                round_id=self.config.round_id, config_digest=self.config.digest,
                signatures=tuple((s, self._signatures[s]) for s in sorted(self.graph.neighbourhood(site) & signed)),
                self_mask_ids=tuple(sorted(held & shown)), key_ids=tuple(sorted(held - shown)),
            )
        return dict(self._requests)


class _ClaimSurvivorDropped(_CoordinatorBase):
    """Receives the target's masked input, then tells everyone it dropped, to get its key shares."""

    def _close_masked_input(self):  # type: ignore[no-untyped-def]
        out = super()._close_masked_input()
        self.u3 = frozenset(self.u3 - {self.target})
        claimed = tuple(sorted(self.u3))
        return {s: dataclasses.replace(m, survivors=claimed) for s, m in out.items()}


class _LowerThreshold(_CoordinatorBase):
    """After setup, switches to a configuration with the threshold lowered to 2."""

    def _lowered(self) -> bytes:
        return dataclasses.replace(self.config, threshold=2).digest

    def _close_advertise_keys(self):  # type: ignore[no-untyped-def]
        out = super()._close_advertise_keys()
        return {s: dataclasses.replace(m, config_digest=self._lowered()) for s, m in out.items()}


class _ReplayEarlierRound(_CoordinatorBase):
    """Relays, in round 2, the key advertisements the sites signed in round 1."""

    earlier: dict[int, KeyAdvertisement] = {}

    def _close_advertise_keys(self):  # type: ignore[no-untyped-def]
        out = super()._close_advertise_keys()
        for site, directory in out.items():
            entries = tuple(
                dataclasses.replace(self.earlier[e.sender], round_id=self.config.round_id, config_digest=self.config.digest)
                if e.sender in self.earlier else e
                for e in directory.entries
            )
            out[site] = dataclasses.replace(directory, entries=entries)
        return out


class _IsolateInSparseGraph(_CoordinatorBase):
    """Lets the target mask only against t-1 neighbours, then declares those neighbours dropped
    to everyone else, to collect their key shares while the target's self mask is revealed."""

    def _close_share_keys(self):  # type: ignore[no-untyped-def]
        out = super()._close_share_keys()
        u, t = self.target, self.config.threshold
        if u not in out:
            return out
        near = sorted(self.graph.neighbours(u) & self._delivered[u])
        # Keep the two ends of the target's ring window (so every other holder's neighbourhood
        # misses one of them) and fill up to t - 1 members.
        ring = getattr(self.graph, "_ring", None)
        ends = []
        if ring is not None:
            pos, half = ring.index(u), self.graph.degree() // 2
            ends = [ring[(pos - half) % len(ring)], ring[(pos + half) % len(ring)]]
        chosen = [p for p in ends if p in near]
        chosen += [p for p in near if p not in chosen][: max(0, t - 1 - len(chosen))]
        self.isolated_with = frozenset(chosen[: t - 1])
        out[u] = dataclasses.replace(out[u], items=tuple(i for i in out[u].items if i.sender in self.isolated_with))
        self._delivered = {**self._delivered, u: self.isolated_with}
        self.knowledge.masked_with.update(self._delivered)
        return out

    def _close_masked_input(self):  # type: ignore[no-untyped-def]
        out = super()._close_masked_input()
        u, group = self.target, self.isolated_with | {self.target}
        everyone = set(self.u3)
        hidden = set(self.graph.neighbourhood(u)) - group
        self._lists = {
            s: tuple(sorted(everyone - hidden if s in group else everyone - self.isolated_with)) for s in out
        }
        return {s: dataclasses.replace(m, survivors=self._lists[s]) for s, m in out.items()}

    def _receive_consistency_check(self, message):  # type: ignore[no-untyped-def]
        self._signatures[message.sender] = message.signature  # accepted unchecked, to be relayed

    def _close_consistency_check(self):  # type: ignore[no-untyped-def]
        self._enter(Stage.UNMASK)
        u = self.target
        for site in sorted(self._signatures):
            shown = self._lists[site]
            held = (self._delivered.get(site, frozenset()) | {site}) & set(self.graph.neighbourhood(site))
            same = [s for s in sorted(self._signatures) if self._lists.get(s) == shown]
            self._requests[site] = UnmaskRequest(
                round_id=self.config.round_id, config_digest=self.config.digest,
                signatures=tuple((s, self._signatures[s]) for s in same),
                self_mask_ids=tuple(sorted({u} & held & set(shown))),
                key_ids=tuple(sorted(self.isolated_with & held - set(shown))),
                attestations=tuple(a for o, a in self._attestations.items() if o == u and o != site),
            )
        return dict(self._requests)


_ATTACKS: dict[str, tuple[type[_CoordinatorBase], str]] = {
    "request-both-shares": (_RequestBothShares, _RequestBothShares.__doc__ or ""),
    "substitute-public-key": (_SubstitutePublicKey, _SubstitutePublicKey.__doc__ or ""),
    "inconsistent-survivor-lists": (_InconsistentSurvivorLists, _InconsistentSurvivorLists.__doc__ or ""),
    "lower-threshold": (_LowerThreshold, _LowerThreshold.__doc__ or ""),
    "replay-earlier-round": (_ReplayEarlierRound, _ReplayEarlierRound.__doc__ or ""),
    "claim-survivor-dropped": (_ClaimSurvivorDropped, _ClaimSurvivorDropped.__doc__ or ""),
    "isolate-in-sparse-graph": (_IsolateInSparseGraph, _IsolateInSparseGraph.__doc__ or ""),
}


def names() -> list[str]:
    """The scripted attacks, by name."""
    return list(_ATTACKS)


def describe(name: str) -> str:
    return _lookup(name)[1].strip()


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
) -> AttackOutcome:
    """Play attack ``name`` against honest clients holding ``vectors``; see :class:`AttackOutcome`."""
    server_cls, _ = _lookup(name)
    arrays, length = _as_matrix(vectors)
    n = len(arrays)
    if not 0 <= target < n:
        raise ConfigError(f"target {target} is not a site index (0..{n - 1})")
    rng: RandomSource = SeededRandom(seed) if seed is not None else SystemRandom()
    fork: Callable[[str], RandomSource] = (lambda l: rng.fork(l)) if isinstance(rng, SeededRandom) else (lambda l: rng)
    identities, roster = simulated_federation(n, fork("identities"))

    def play(round_id: int, cls: type[_CoordinatorBase], knowledge: _Knowledge, previous: int | None) -> tuple[_Simulation, SecAggServer, RoundConfig]:
        round_config = config.round_config(
            n_sites=n, vector_length=length, round_id=round_id, roster_digest=roster.digest(),
            graph_seed=fork(f"graph-{round_id}").random_bytes(32),
        )
        server = cls(round_config, roster, knowledge, fork(f"coordinator-{round_id}"))
        server.target = target
        clients = {
            i: SecAggClient(identity=identities[i], roster=roster, vector=arrays[i], rng=fork(f"site-{i}-{round_id}"),
                            previous_round=previous, policy=config if enforce_checks else None,
                            enforce_checks=enforce_checks)
            for i in range(n)
        }
        sim = _Simulation(server, clients, vanish={}, keep_messages=True, workers=1)
        return sim, server, round_config

    knowledge = _Knowledge()
    round_id, previous = 1, None
    if server_cls is _ReplayEarlierRound:
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
