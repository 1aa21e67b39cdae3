"""The malicious coordinators behind :mod:`securefed.secagg.attacks`.

Each is an honest :class:`SecAggServer` with one documented deviation, written as an override of
the stage it changes. They are research tools: nothing else in securefed imports them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from securefed.errors import DecryptionError, ProtocolAbort
from securefed.primitives import aead
from securefed.primitives.keys import AgreementKeyPair, Roster, agree
from securefed.primitives.randomness import RandomSource
from securefed.secagg.config import RoundConfig
from securefed.secagg.masking import (
    SHARE_BYTES,
    decode_share_plaintext,
    encode_share_plaintext,
    share_associated_data,
    share_encryption_key,
)
from securefed.secagg.messages import EncryptedShare, KeyAdvertisement, UnmaskRequest
from securefed.secagg.server import SecAggServer
from securefed.secagg.stages import Stage


@dataclass
class _Knowledge:
    """What the coordinator holds beyond the messages it received."""

    forged_masking: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (victim, peer) -> secret
    forged_encryption: dict[tuple[int, int], bytes] = field(default_factory=dict)
    masked_with: dict[int, frozenset[int]] = field(default_factory=dict)  # site -> peers it masked against
    extra_shares: dict[str, dict[int, dict[int, bytes]]] = field(
        default_factory=lambda: {"mask": {}, "key": {}}
    )
    primed: dict[int, tuple[tuple[int, ...], bytes]] = field(default_factory=dict)  # from an earlier run


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

    def _deliver_only(self, out, members: frozenset[int]):  # type: ignore[no-untyped-def]
        """Withhold from the target every share except those of ``members``, so it masks only
        against them."""
        u = self.target
        self.isolated_with = members
        out[u] = dataclasses.replace(out[u], items=tuple(i for i in out[u].items if i.sender in members))
        self._delivered = {**self._delivered, u: members}
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
        return self._deliver_only(out, frozenset(chosen[: t - 1]))

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
                attestations=tuple(
                    (o, tags[site]) for o, tags in self._attestations.items() if o == u and o != site and site in tags
                ),
            )
        return dict(self._requests)


def _ring_neighbour(server: SecAggServer, site: int, step: int) -> int:
    ring = getattr(server.graph, "_ring", None)
    if ring is None:  # complete graph: any fixed order will do
        ring = list(server.config.participants)
    return ring[(ring.index(site) + step) % len(ring)]


class _PrimingRun(_CoordinatorBase):
    """First run of a configuration: shows everyone one list, keeps the signatures, stops."""

    def _close_masked_input(self):  # type: ignore[no-untyped-def]
        out = super()._close_masked_input()
        u = self.target
        hidden = {_ring_neighbour(self, u, -1), _ring_neighbour(self, u, 1)} - {u}
        self.shown = tuple(sorted(set(self.u3) - hidden))
        return {s: dataclasses.replace(m, survivors=self.shown) for s, m in out.items()}

    def _receive_consistency_check(self, message):  # type: ignore[no-untyped-def]
        self._signatures[message.sender] = message.signature

    def _close_consistency_check(self):  # type: ignore[no-untyped-def]
        self.knowledge.primed = {s: (self.shown, sig) for s, sig in self._signatures.items()}
        raise ProtocolAbort("the coordinator stops the priming run here")


class _RerunSameRound(_CoordinatorBase):
    """Runs the same round configuration again and, where a site's fresh signature does not fit,
    relays the one it gave in an earlier run, to certify two lists in one neighbourhood."""

    def _close_share_keys(self):  # type: ignore[no-untyped-def]
        out = super()._close_share_keys()
        u = self.target
        if u not in out:
            return out
        return self._deliver_only(out, frozenset({_ring_neighbour(self, u, -2), _ring_neighbour(self, u, 2)} - {u}))

    def _close_masked_input(self):  # type: ignore[no-untyped-def]
        out = super()._close_masked_input()
        u, alive = self.target, set(self.u3)
        first = tuple(sorted(alive - {_ring_neighbour(self, u, -1), _ring_neighbour(self, u, 1)}))
        second = tuple(sorted(alive - self.isolated_with))
        self._lists = {s: (first if s in self.isolated_with | {u} else second) for s in out}
        return {s: dataclasses.replace(m, survivors=self._lists[s]) for s, m in out.items()}

    def _receive_consistency_check(self, message):  # type: ignore[no-untyped-def]
        self._signatures[message.sender] = message.signature

    def _close_consistency_check(self):  # type: ignore[no-untyped-def]
        self._enter(Stage.UNMASK)
        u, primed = self.target, getattr(self.knowledge, "primed", {})
        for site in sorted(self._signatures):
            mine = self._lists[site]
            relayed = []
            for s in mine:
                if self._lists.get(s) == mine and s in self._signatures:
                    relayed.append((s, self._signatures[s]))
                elif s in primed and primed[s][0] == mine:
                    relayed.append((s, primed[s][1]))
            held = self._delivered[site] | {site}
            self_ids = ({u} & held) if site in self.isolated_with | {u} else set()
            self._requests[site] = UnmaskRequest(
                round_id=self.config.round_id, config_digest=self.config.digest, signatures=tuple(relayed),
                self_mask_ids=tuple(sorted(self_ids)), key_ids=tuple(sorted((self.isolated_with & held) - set(mine))),
                attestations=tuple(
                    (o, self._attestations[o][site]) for o in sorted(self_ids - {site})
                    if site in self._attestations.get(o, {})
                ),
            )
        return dict(self._requests)
