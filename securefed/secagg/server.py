"""The coordinator side of SecAgg+ as a pure state machine.

The runtime calls :meth:`SecAggServer.begin`, delivers each client reply with
:meth:`receive`, and calls :meth:`close_stage` when a stage's deadline passes; ``close_stage``
returns the next messages to send, and after the unmask stage the aggregate. Sites that did not
answer in time are simply absent: the round goes on while every needed neighbourhood still has
``threshold`` live members, and otherwise ends in :class:`~securefed.errors.ProtocolAbort`
naming the stage and the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from securefed.errors import (
    InvalidSignatureError,
    ProtocolAbort,
    ReconstructionError,
    UnexpectedMessageError,
)
from securefed.primitives.keys import AgreementKeyPair, PublicIdentity, Roster, agree
from securefed.primitives.prg import MaskAccumulator
from securefed.primitives.shamir import reconstruct_secrets
from securefed.secagg.certification import certified_count
from securefed.secagg.config import RoundConfig
from securefed.secagg.graph import NeighbourGraph
from securefed.secagg.masking import pairwise_seed
from securefed.secagg.messages import (
    ClientMessage,
    ConsistencySignature,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RoundSetup,
    ShareBundle,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
    survivors_statement,
)
from securefed.secagg.stages import ALLOWED_TRANSITIONS, Stage

__all__ = ["SecAggServer", "AggregateResult"]


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """What the coordinator learns: the sum over the survivors, nothing per site."""

    survivors: frozenset[int]
    total: np.ndarray  # float64: the weighted sum of the survivors' inputs
    total_weight: float  # the sum of the survivors' weights
    raw: np.ndarray  # the sum in Z_(2^b), before decoding


class SecAggServer:
    def __init__(self, config: RoundConfig, roster: Roster) -> None:
        problems = config.problems()
        outside = [p for p in config.participants if p >= len(roster)]
        if outside:
            problems.append(f"participants {outside[:5]} are not in the roster of {len(roster)} sites")
        if config.roster_digest != roster.digest():
            problems.append("the round configuration names a different roster")
        if problems:
            raise ProtocolAbort("invalid round configuration: " + "; ".join(problems))
        self.config = config
        self.roster = roster
        self._identities = tuple(roster[name] for name in roster.names)
        self.graph = NeighbourGraph(config.participants, config.neighbors, config.graph_seed)
        self.stage: Stage | None = None
        self.finished = False
        self._participants = frozenset(config.participants)
        self.rejected: dict[int, str] = {}  # sender -> why its message was refused
        self._ads: dict[int, KeyAdvertisement] = {}
        self._bundles: dict[int, ShareBundle] = {}
        self._masked_senders: set[int] = set()
        self._attestations: dict[int, dict[int, bytes]] = {}  # owner -> peer -> tag
        self._sum = MaskAccumulator(config.vector_length + 1, dtype=config.value_codec().dtype)
        self._signatures: dict[int, bytes] = {}
        self._confirmations: dict[int, dict[int, bytes]] = {}  # signer -> neighbour -> tag
        self._unmask: dict[int, UnmaskShares] = {}
        self.u1: frozenset[int] = frozenset()
        self.u2: frozenset[int] = frozenset()
        self.u3: frozenset[int] = frozenset()
        self.u4: frozenset[int] = frozenset()
        self._delivered: dict[int, frozenset[int]] = {}
        self._requests: dict[int, UnmaskRequest] = {}

    # ------------------------------------------------------------------ plumbing
    def _enter(self, stage: Stage) -> None:
        if (self.stage, stage) not in ALLOWED_TRANSITIONS:
            current = self.stage.value if self.stage else "not started"
            raise UnexpectedMessageError(f"cannot move from stage {current} to {stage.value}")
        self.stage = stage

    def _abort(self, message: str) -> None:
        self.finished = True
        raise ProtocolAbort(message, stage=self.stage.value if self.stage else None)

    def _public(self, site: int) -> PublicIdentity:
        if not 0 <= site < len(self._identities):
            raise UnexpectedMessageError(f"site {site} is not in the federation roster")
        return self._identities[site]

    def _viable(self, alive: set[int] | frozenset[int]) -> frozenset[int]:
        """Sites whose neighbourhood still has ``threshold`` members in ``alive`` (to a fixpoint)."""
        current = set(alive)
        t = self.config.threshold
        changed = True
        while changed:
            changed = False
            for site in list(current):
                if len(self.graph.neighbourhood(site) & current) < t:
                    current.discard(site)
                    changed = True
        return frozenset(current)

    def _require(self, alive: frozenset[int], responded: int, what: str) -> None:
        t = self.config.threshold
        if len(alive) < t:
            self._abort(
                f"{responded} of {self.config.n_sites} sites {what} and {len(alive)} can continue; "
                f"threshold is {t}, so the round cannot complete"
            )

    def _header(self) -> dict[str, object]:
        return {"round_id": self.config.round_id, "config_digest": self.config.digest}

    # ------------------------------------------------------------------ public API
    def begin(self) -> dict[int, RoundSetup]:
        self._enter(Stage.ADVERTISE_KEYS)
        setup = RoundSetup.for_config(self.config)
        return {site: setup for site in self.config.participants}

    def receive(self, message: ClientMessage) -> None:
        """Accept one client reply for the current stage; raise if it does not belong here."""
        if self.finished or self.stage is None:
            raise UnexpectedMessageError("the round is not collecting messages")
        if message.STAGE is not self.stage:
            raise UnexpectedMessageError(
                f"{type(message).__name__} belongs to stage {message.STAGE.value}, "
                f"but the round is in stage {self.stage.value}"
            )
        if message.round_id != self.config.round_id or message.config_digest != self.config.digest:
            raise UnexpectedMessageError(f"{type(message).__name__} is from another round")
        sender = message.sender
        expected = {
            Stage.ADVERTISE_KEYS: self._participants,
            Stage.SHARE_KEYS: self.u1,
            Stage.MASKED_INPUT: self.u2,
            Stage.CONSISTENCY_CHECK: self.u3,
            Stage.UNMASK: frozenset(self._requests),
        }[self.stage]
        if sender not in expected:
            raise UnexpectedMessageError(f"site {sender} is not expected in stage {self.stage.value}")
        getattr(self, f"_receive_{self.stage.value}")(message)

    def close_stage(self) -> dict[int, object] | AggregateResult:
        """End the current stage with whoever answered; return the next messages or the result."""
        if self.finished or self.stage is None:
            raise UnexpectedMessageError("the round is not collecting messages")
        return getattr(self, f"_close_{self.stage.value}")()

    # ------------------------------------------------------------------ advertise_keys
    def _receive_advertise_keys(self, ad: KeyAdvertisement) -> None:
        if ad.sender in self._ads:
            raise UnexpectedMessageError(f"site {ad.sender} advertised keys twice")
        try:
            self._public(ad.sender).verify(ad.statement(), ad.signature)
        except InvalidSignatureError:
            self.rejected[ad.sender] = "advertised keys not signed by the roster key"
            return
        self._ads[ad.sender] = ad

    def _close_advertise_keys(self) -> dict[int, object]:
        self.u1 = self._viable(set(self._ads))
        self._require(self.u1, len(self._ads), "advertised keys")
        self._enter(Stage.SHARE_KEYS)
        return {
            site: KeyDirectory(
                **self._header(),
                entries=tuple(self._ads[v] for v in sorted(self.graph.neighbours(site) & self.u1)),
            )
            for site in sorted(self.u1)
        }

    # ------------------------------------------------------------------ share_keys
    def _receive_share_keys(self, bundle: ShareBundle) -> None:
        if bundle.sender in self._bundles:
            raise UnexpectedMessageError(f"site {bundle.sender} sent its shares twice")
        allowed = self.graph.neighbours(bundle.sender) & self.u1
        for item in bundle.items:
            if item.sender != bundle.sender or item.recipient not in allowed:
                self.rejected[bundle.sender] = "share bundle addressed outside its neighbourhood"
                return
        self._bundles[bundle.sender] = bundle

    def _close_share_keys(self) -> dict[int, object]:
        self.u2 = self._viable(set(self._bundles))
        self._require(self.u2, len(self._bundles), "shared their keys")
        self._enter(Stage.MASKED_INPUT)
        inbox: dict[int, list] = {site: [] for site in self.u2}
        for sender in sorted(self.u2):
            for item in self._bundles[sender].items:
                if item.recipient in inbox:
                    inbox[item.recipient].append(item)
        self._delivered = {site: frozenset(i.sender for i in items) for site, items in inbox.items()}
        self._bundles.clear()
        return {site: ShareDelivery(**self._header(), items=tuple(items)) for site, items in inbox.items()}

    # ------------------------------------------------------------------ masked_input
    def _receive_masked_input(self, message: MaskedInput) -> None:
        if message.sender in self._masked_senders:
            raise UnexpectedMessageError(f"site {message.sender} sent its masked input twice")
        values = message.values
        expected_dtype = self._sum.values.dtype
        if values.dtype != expected_dtype or values.shape != self._sum.values.shape:
            self.rejected[message.sender] = (
                f"masked input of {values.dtype}{values.shape}, expected {expected_dtype}{self._sum.values.shape}"
            )
            return
        attestation = message.attestation
        if not self.graph.complete:
            # Only the peers can check the tags; the coordinator checks the peers are the ones
            # whose shares it delivered, so it knows which masks to remove.
            if attestation is None or attestation.masked_with != tuple(sorted(self._delivered.get(message.sender, ()))):
                self.rejected[message.sender] = "masking attestation missing or not matching the shares delivered"
                return
            self._attestations[message.sender] = dict(attestation.tags)
        self._masked_senders.add(message.sender)
        self._sum.add_array(values)  # only the running sum is kept, never a site's vector

    def _close_masked_input(self) -> dict[int, object]:
        self.u3 = frozenset(self._masked_senders)
        self._require(self.u3, len(self.u3), "sent masked inputs")
        self._enter(Stage.CONSISTENCY_CHECK)
        message = SurvivorList(**self._header(), survivors=tuple(sorted(self.u3)))
        return {site: message for site in sorted(self.u3)}

    # ------------------------------------------------------------------ consistency_check
    def _receive_consistency_check(self, message: ConsistencySignature) -> None:
        if message.sender in self._signatures:
            raise UnexpectedMessageError(f"site {message.sender} signed twice")
        statement = survivors_statement(self.config.digest, tuple(sorted(self.u3)))
        try:
            self._public(message.sender).verify(statement, message.signature)
        except InvalidSignatureError:
            self.rejected[message.sender] = "survivor-list signature does not verify"
            return
        self._signatures[message.sender] = message.signature
        self._confirmations[message.sender] = dict(message.tags)

    def _close_consistency_check(self) -> dict[int, object]:
        signed = frozenset(self._signatures)
        t = self.config.threshold

        def certified(owner: int) -> bool:  # see securefed.secagg.certification
            return certified_count(self.graph, owner, signed) >= t

        self.u4 = frozenset(s for s in signed if certified(s))
        self._require(self.u4, len(signed), "confirmed the survivor list")
        self._enter(Stage.UNMASK)
        for site in sorted(self.u4):
            held = self._delivered[site] | {site}
            # Ask only for what the holder's rules let it reveal, so honest holders never abort.
            self_ids = {
                o for o in held & self.u3
                if o == site or (
                    (self.graph.complete or site in self._attestations[o]) and certified(o)
                )
            }
            key_ids = {o for o in held - self.u3 if certified(o)}
            relevant = set(self.graph.neighbourhood(site))
            if not self.graph.complete:
                for owner in self_ids | key_ids:
                    relevant |= self.graph.neighbourhood(owner)
            # Neighbours' confirmations replace their signatures; the holder's own is not needed.
            tagged = {s for s in relevant & signed if site in self._confirmations.get(s, {})}
            self._requests[site] = UnmaskRequest(
                **self._header(),
                signatures=tuple((s, self._signatures[s]) for s in sorted((relevant & signed) - tagged - {site})),
                confirmations=tuple((s, self._confirmations[s][site]) for s in sorted(tagged)),
                self_mask_ids=tuple(sorted(self_ids)),
                key_ids=tuple(sorted(key_ids)),
                attestations=() if self.graph.complete else tuple(
                    (o, self._attestations[o][site]) for o in sorted(self_ids - {site})
                ),
            )
        return dict(self._requests)

    # ------------------------------------------------------------------ unmask
    def _receive_unmask(self, message: UnmaskShares) -> None:
        if message.sender in self._unmask:
            raise UnexpectedMessageError(f"site {message.sender} answered the unmask request twice")
        request = self._requests[message.sender]
        got_self = tuple(s.owner for s in message.self_mask_shares)
        got_key = tuple(s.owner for s in message.key_shares)
        if not set(got_self) <= set(request.self_mask_ids) or not set(got_key) <= set(request.key_ids):
            self.rejected[message.sender] = "revealed shares that were not requested"
            return
        self._unmask[message.sender] = message

    def _close_unmask(self) -> AggregateResult:
        config = self.config
        t = config.threshold
        mask_shares: dict[int, dict[int, bytes]] = {}
        key_shares: dict[int, dict[int, bytes]] = {}
        for holder, message in self._unmask.items():
            for item in message.self_mask_shares:
                mask_shares.setdefault(item.owner, {})[holder + 1] = item.share
            for item in message.key_shares:
                key_shares.setdefault(item.owner, {})[holder + 1] = item.share
        survivors = sorted(self.u3)
        # Dropped sites whose pairwise masks some survivor applied, and which survivors.
        dropped: dict[int, list[int]] = {}
        for site in survivors:
            for peer in self._delivered[site] - self.u3:
                dropped.setdefault(peer, []).append(site)
        for site in survivors:
            have = len(mask_shares.get(site, {}))
            if have < t:
                self._abort(
                    f"{len(self._unmask)} sites answered; site {site}'s self mask needs {t} shares "
                    f"and only {have} arrived, so the round cannot complete"
                )
        for site in dropped:
            have = len(key_shares.get(site, {}))
            if have < t:
                self._abort(
                    f"{len(self._unmask)} sites answered; dropped site {site}'s masking key needs {t} "
                    f"shares and only {have} arrived, so the round cannot complete"
                )
        try:
            seeds = reconstruct_secrets([mask_shares[s] for s in survivors], threshold=t)
            keys = reconstruct_secrets([key_shares[s] for s in dropped], threshold=t)
        except ReconstructionError as exc:
            self._abort(f"reconstruction failed: {exc}")
        total = self._sum
        for seed in seeds:
            total.subtract(seed)
        for (site, appliers), secret in zip(dropped.items(), keys):
            if AgreementKeyPair.from_secret(secret).public != self._ads[site].masking_key:
                self._abort(f"the masking key reconstructed for site {site} does not match its advertised key")
            for applier in appliers:
                shared = agree(secret, self._ads[applier].masking_key)
                seed = pairwise_seed(shared, digest=config.digest, a=site, b=applier)
                # The applier added the mask if its id is the smaller one; undo exactly that.
                if applier < site:
                    total.subtract(seed)
                else:
                    total.add(seed)
        raw = total.values
        values = config.value_codec().decode(raw[:-1])
        weight = float(config.weight_codec().decode(raw[-1:])[0])
        self.finished = True
        return AggregateResult(survivors=self.u3, total=values, total_weight=weight, raw=raw.copy())
