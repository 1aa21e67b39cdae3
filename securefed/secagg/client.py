"""The client (site) side of SecAgg+ as a pure state machine.

``handle(message)`` takes one coordinator message and returns the reply. The client trusts the
coordinator with nothing: it checks every relayed key against the roster, binds the round
configuration into each signature, verifies the survivor list with its neighbours' signatures,
and reveals for each peer either the self-mask share or the key share, never both. Any violation
raises :class:`~securefed.errors.ProtocolAbort` (or ``UnexpectedMessageError`` for a message out
of order) and leaves the client aborted for good.
"""

from __future__ import annotations

import enum
import hmac

import numpy as np

from securefed.errors import (
    CryptoError,
    DecryptionError,
    InvalidSignatureError,
    ProtocolAbort,
    ProtocolError,
    UnexpectedMessageError,
)
from securefed.primitives import aead
from securefed.primitives.keys import AgreementKeyPair, PublicIdentity, Roster, SiteIdentity
from securefed.primitives.prg import MaskAccumulator
from securefed.primitives.randomness import RandomSource
from securefed.primitives.shamir import share_secrets
from securefed.secagg.certification import Certificates
from securefed.secagg.config import RoundConfig, SecAggConfig, round_config_problems
from securefed.secagg.graph import NeighbourGraph
from securefed.secagg.masking import (
    attestation_key,
    attestation_tag,
    confirmation_tag,
    decode_share_plaintext,
    encode_share_plaintext,
    pairwise_seed,
    share_associated_data,
    share_encryption_key,
)
from securefed.secagg.messages import (
    ConsistencySignature,
    EncryptedShare,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    MaskingAttestation,
    RevealedShare,
    RoundSetup,
    ServerMessage,
    ShareBundle,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
    survivors_statement,
)
from securefed.secagg.modular import ModularInput
from securefed.secagg.stages import Stage

__all__ = ["SecAggClient", "ClientState", "encode_input"]


class ClientState(enum.Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    CONFIRMED = "confirmed"
    DONE = "done"
    ABORTED = "aborted"


# Which coordinator message each state waits for.
_EXPECTS: dict[ClientState, type] = {
    ClientState.NEW: RoundSetup,
    ClientState.ADVERTISED: KeyDirectory,
    ClientState.SHARED: ShareDelivery,
    ClientState.MASKED: SurvivorList,
    ClientState.CONFIRMED: UnmaskRequest,
}


def encode_input(config: RoundConfig, vector: np.ndarray | ModularInput, weight: float, rng: RandomSource) -> np.ndarray:
    """Fixed-point encoding of ``weight * vector`` followed by the encoded weight itself."""
    values = np.empty(config.vector_length + 1, dtype=config.value_codec().dtype)
    if isinstance(vector, ModularInput):  # already in the ring: summed exactly as given
        values[:-1] = vector.values
    elif weight == config.max_weight:
        # The codec clips at clip * max_weight, which equals clip(x) * weight here.
        scaled = vector if weight == 1.0 else np.multiply(vector, weight, dtype=np.float64)
    else:
        scaled = np.clip(vector, -config.clip, config.clip, dtype=np.float64)
        np.multiply(scaled, weight, out=scaled)
    if not isinstance(vector, ModularInput):
        values[:-1] = config.value_codec().encode(scaled, rng)
    values[-1:] = config.weight_codec().encode(np.array([weight], dtype=np.float64), rng)
    return values


class SecAggClient:
    """One site's side of one round. Create a new client for every round."""

    def __init__(
        self,
        *,
        identity: SiteIdentity,
        roster: Roster,
        vector: np.ndarray | ModularInput,
        weight: float = 1.0,
        rng: RandomSource,
        previous_round: int | None,
        policy: SecAggConfig | None = None,
        enforce_checks: bool = True,
    ) -> None:
        """``previous_round`` (required): the last round id this site *started*, or None if it never
        started one. A deployment must persist it: any round id not above it is refused, so
        nothing a site signed in an earlier or aborted run (of the same round, too) can be
        replayed; the certificates of :mod:`securefed.secagg.certification` rely on it. ``policy``: the settings the federation agreed; a round configuration
        weaker than it (lower threshold, sparser graph, other bit width or clip) is refused."""
        if identity.name not in roster:
            raise ProtocolAbort(f"site {identity.name!r} is not in the federation roster")
        self.identity = identity
        self.roster = roster
        self.site_id = roster.index(identity.name)
        self._identities = tuple(roster[name] for name in roster.names)
        self._vector = vector
        self._weight = float(weight)
        self._rng = rng
        self._previous_round = previous_round
        self._policy = policy
        # Research only: a client that trusts the coordinator (as Flower's does), so the attack
        # harness can show what each check prevents. Never turn this off in a deployment.
        self._enforce = enforce_checks
        self.state = ClientState.NEW
        self.stage: Stage | None = None
        self.abort_reason: str | None = None
        self.config: RoundConfig | None = None
        self._survivors: frozenset[int] | None = None

    @property
    def survivors(self) -> frozenset[int] | None:
        """The sites whose inputs the sum will hold, once the signed survivor list arrived."""
        return self._survivors

    # ------------------------------------------------------------------ dispatch
    def handle(self, message: ServerMessage) -> object:
        if self.state is ClientState.ABORTED:
            raise ProtocolAbort("this client has already aborted the round", stage=self._stage_name())
        if self.state is ClientState.DONE:
            self._abort_with(UnexpectedMessageError(
                f"received {type(message).__name__} after the round finished"
            ))
        expected = _EXPECTS[self.state]
        if not isinstance(message, expected):
            self._abort_with(UnexpectedMessageError(
                f"site {self.site_id} expected {expected.__name__} in state {self.state.value}, "
                f"got {type(message).__name__}"
            ))
        self.stage = message.STAGE
        try:
            if self.config is not None:
                self._check_round(message)
            handler = {
                RoundSetup: self._on_setup,
                KeyDirectory: self._on_directory,
                ShareDelivery: self._on_delivery,
                SurvivorList: self._on_survivors,
                UnmaskRequest: self._on_unmask,
            }[type(message)]
            reply = handler(message)
        except ProtocolError as exc:
            self._abort_with(exc)
        except (CryptoError, ValueError) as exc:
            self._abort_with(ProtocolAbort(str(exc), stage=self._stage_name()))
        if self.state is not ClientState.DONE:
            self.state = self._NEXT[self.state]
        return reply

    def _abort_with(self, exc: ProtocolError) -> None:
        self.state = ClientState.ABORTED
        self.abort_reason = str(exc)
        self._forget_secrets()
        raise exc

    def _fail(self, reason: str) -> None:
        raise ProtocolAbort(f"site {self.site_id}: {reason}", stage=self._stage_name())

    def _violation(self, reason: str) -> None:
        """A sign of a misbehaving coordinator: abort (unless checks are disabled for research)."""
        if self._enforce:
            self._fail(reason)

    def _stage_name(self) -> str | None:
        return self.stage.value if self.stage else None

    def _forget_secrets(self) -> None:
        for name in ("_c_keys", "_s_keys", "_self_mask_seed", "_held", "_vector", "_share_keys"):
            if hasattr(self, name):
                setattr(self, name, None)

    def _check_round(self, message: ServerMessage) -> None:
        assert self.config is not None
        if message.round_id != self.config.round_id:
            self._fail(f"message for round {message.round_id}, but this is round {self.config.round_id} (replay?)")
        if message.config_digest != self.config.digest:
            self._fail("message is bound to a different round configuration (threshold or settings changed?)")

    def _public(self, site: int) -> PublicIdentity:
        if not 0 <= site < len(self._identities):
            self._fail(f"site {site} is not in the federation roster")
        return self._identities[site]

    # ------------------------------------------------------------------ stage handlers
    def _on_setup(self, message: RoundSetup) -> KeyAdvertisement:
        config = message.config
        if self._previous_round is not None and config.round_id <= self._previous_round:
            self._fail(f"round {config.round_id} is not newer than round {self._previous_round} (replay)")
        problems = round_config_problems(config, roster=self.roster, site_id=self.site_id, policy=self._policy)
        if self._vector is not None and np.shape(self._vector) != (config.vector_length,):
            problems.append(f"input has shape {np.shape(self._vector)}, the round expects ({config.vector_length},)")
        if isinstance(self._vector, ModularInput):
            problems.extend(self._vector.check_ring(config.bit_width))
        if not 0.0 <= self._weight <= config.max_weight:
            problems.append(f"this site's weight is outside [0, max_weight={config.max_weight}]")
        if problems:
            self._fail("refusing the round configuration: " + "; ".join(problems))
        self.config = config
        self.graph = NeighbourGraph(config.participants, config.neighbors, config.graph_seed)
        self.neighbours = self.graph.neighbours(self.site_id)
        self._c_keys = AgreementKeyPair.generate(self._rng)
        self._s_keys = AgreementKeyPair.generate(self._rng)
        ad = KeyAdvertisement(
            round_id=config.round_id, config_digest=config.digest, sender=self.site_id,
            encryption_key=self._c_keys.public, masking_key=self._s_keys.public, signature=b"\0" * 64,
        )
        signature = self.identity.sign(ad.statement())
        self._own_ad = KeyAdvertisement(
            round_id=ad.round_id, config_digest=ad.config_digest, sender=ad.sender,
            encryption_key=ad.encryption_key, masking_key=ad.masking_key, signature=signature,
        )
        return self._own_ad

    def _on_directory(self, message: KeyDirectory) -> ShareBundle:
        config = self.config
        assert config is not None
        peers: dict[int, KeyAdvertisement] = {}
        seen_keys = {self._c_keys.public, self._s_keys.public}
        for ad in message.entries:
            if ad.sender == self.site_id:
                if ad != self._own_ad:
                    self._violation("the coordinator relayed a different advertisement under this site's id")
                continue
            if ad.sender not in self.neighbours:
                self._violation(f"site {ad.sender} is not a neighbour of this site in the round graph")
            if ad.round_id != config.round_id or ad.config_digest != config.digest:
                self._fail(f"advertisement of site {ad.sender} belongs to another round")
            if self._enforce:
                try:
                    self._public(ad.sender).verify(ad.statement(), ad.signature)
                except InvalidSignatureError:
                    self._fail(
                        f"the advertised keys of site {ad.sender} are not signed by its roster key "
                        "(substituted keys or a replay from another round)"
                    )
            if ad.encryption_key in seen_keys or ad.masking_key in seen_keys or ad.encryption_key == ad.masking_key:
                self._fail(f"site {ad.sender} advertised a key already in use in this round")
            seen_keys.update((ad.encryption_key, ad.masking_key))
            peers[ad.sender] = ad
        if len(peers) + 1 < config.threshold:
            self._fail(
                f"only {len(peers) + 1} of this site's neighbourhood advertised keys; threshold is {config.threshold}"
            )
        self._peers = peers
        self._share_keys: dict[int, tuple[bytes, bytes]] = {}
        self._self_mask_seed = self._rng.random_bytes(32)
        holders = sorted([self.site_id, *peers])
        shares = share_secrets(
            [self._s_keys.secret, self._self_mask_seed],
            threshold=config.threshold,
            share_ids=[h + 1 for h in holders],
            rng=self._rng,
        )
        items = []
        self._held: dict[int, tuple[bytes, bytes]] = {}
        for holder, (key_share, mask_share) in zip(holders, shares):
            if holder == self.site_id:
                self._held[holder] = (key_share, mask_share)
                continue
            key = self._share_key(holder)
            plaintext = encode_share_plaintext(self.site_id, holder, key_share, mask_share)
            ad_bytes = share_associated_data(
                digest=config.digest, round_id=config.round_id, sender=self.site_id, recipient=holder
            )
            items.append(EncryptedShare(self.site_id, holder, aead.seal(key, plaintext, associated_data=ad_bytes, rng=self._rng)))
        return ShareBundle(round_id=config.round_id, config_digest=config.digest, sender=self.site_id, items=tuple(items))

    def _share_key(self, peer: int) -> bytes:
        return self._pair_keys(peer)[0]

    def _pair_keys(self, peer: int) -> tuple[bytes, bytes]:
        """(share-encryption key, attestation MAC key) with ``peer``, from one X25519 agreement.

        Cached: the same keys serve our share to the peer, the peer's share to us, and the
        masking attestations in both directions."""
        keys = self._share_keys.get(peer)
        if keys is None:
            assert self.config is not None
            secret = self._c_keys.agree(self._peers[peer].encryption_key)
            digest = self.config.digest
            keys = (
                share_encryption_key(secret, digest=digest, a=self.site_id, b=peer),
                attestation_key(secret, digest=digest, a=self.site_id, b=peer),
            )
            self._share_keys[peer] = keys
        return keys

    def _on_delivery(self, message: ShareDelivery) -> MaskedInput:
        config = self.config
        assert config is not None
        for item in message.items:
            if item.recipient != self.site_id:
                self._fail(f"received a share addressed to site {item.recipient}")
            if item.sender not in self._peers:
                self._fail(f"received a share from site {item.sender}, which did not advertise keys to this site")
            ad_bytes = share_associated_data(
                digest=config.digest, round_id=config.round_id, sender=item.sender, recipient=self.site_id
            )
            try:
                plaintext = aead.open_sealed(self._share_key(item.sender), item.ciphertext, associated_data=ad_bytes)
                sender, recipient, key_share, mask_share = decode_share_plaintext(plaintext)
            except DecryptionError:
                self._fail(f"the share from site {item.sender} does not authenticate")
            if (sender, recipient) != (item.sender, self.site_id):
                self._fail(f"the share from site {item.sender} names the wrong sender or recipient")
            self._held[item.sender] = (key_share, mask_share)
        if len(self._held) < config.threshold:
            self._fail(
                f"shares arrived from only {len(self._held)} of this site's neighbourhood; threshold is {config.threshold}"
            )
        self._masked_with = frozenset(self._held) - {self.site_id}
        accumulator = MaskAccumulator(config.vector_length + 1, dtype=config.value_codec().dtype)
        vector = self._vector if isinstance(self._vector, ModularInput) else np.asarray(self._vector)
        accumulator.add_array(encode_input(config, vector, self._weight, self._rng))
        accumulator.add(self._self_mask_seed)
        for peer in sorted(self._masked_with):
            secret = self._s_keys.agree(self._peers[peer].masking_key)
            seed = pairwise_seed(secret, digest=config.digest, a=self.site_id, b=peer)
            if self.site_id < peer:
                accumulator.add(seed)
            else:
                accumulator.subtract(seed)
        self._vector = None  # the plaintext input is no longer needed
        attestation = None
        if not self.graph.complete:  # see certification.py, rule R2
            tags = tuple(
                (peer, attestation_tag(self._pair_keys(peer)[1], digest=config.digest, owner=self.site_id, peer=peer))
                for peer in sorted(self._masked_with)
            )
            attestation = MaskingAttestation(self.site_id, tags)
        return MaskedInput(round_id=config.round_id, config_digest=config.digest, sender=self.site_id,
                           values=accumulator.values, attestation=attestation)

    def _on_survivors(self, message: SurvivorList) -> ConsistencySignature:
        config = self.config
        assert config is not None
        survivors = message.survivors
        if list(survivors) != sorted(survivors):
            self._fail("the survivor list is not in increasing order")
        unknown = set(survivors) - set(config.participants)
        if unknown:
            self._fail(f"the survivor list names non-participants {sorted(unknown)}")
        if self.site_id not in survivors:
            self._violation("the survivor list omits this site, which did send its masked input")
        near = set(survivors) & self.graph.neighbourhood(self.site_id)
        if not near <= set(self._held):
            self._violation(f"survivors {sorted(near - set(self._held))} never sent shares to this site")
        if len(near) < config.threshold:
            self._fail(f"only {len(near)} of this site's neighbourhood survived; threshold is {config.threshold}")
        self._survivors = frozenset(survivors)
        self._survivor_statement = survivors_statement(config.digest, survivors)
        signature = self.identity.sign(self._survivor_statement)
        tags = tuple(
            (peer, confirmation_tag(self._pair_keys(peer)[1], statement=self._survivor_statement,
                                    signer=self.site_id, peer=peer))
            for peer in sorted(near - {self.site_id})
        )
        return ConsistencySignature(round_id=config.round_id, config_digest=config.digest, sender=self.site_id,
                                    signature=signature, tags=tags)

    def _on_unmask(self, message: UnmaskRequest) -> UnmaskShares:
        config = self.config
        assert config is not None
        relayed: dict[int, bytes] = {}
        for signer, signature in message.signatures:
            if signer in relayed:
                self._violation(f"site {signer}'s survivor signature was relayed twice")
            if signer not in self._survivors:
                self._violation(f"a survivor signature comes from site {signer}, which is not a survivor")
            relayed[signer] = signature
        confirmations: dict[int, bytes] = {}
        for signer, tag in message.confirmations:
            if signer in confirmations or signer in relayed:
                self._violation(f"site {signer}'s survivor confirmation was relayed twice")
            if signer not in self._survivors or signer not in self._peers:
                self._violation(f"a survivor confirmation comes from site {signer}, not a surviving neighbour")
            confirmations[signer] = tag
        certificates = Certificates(
            graph=self.graph, threshold=config.threshold, signatures=relayed,
            verify=self._check_survivor_signature, holder=self.site_id,
            confirmations=confirmations, verify_confirmation=self._check_confirmation,
        )
        if self._enforce and not certificates.certified(self.site_id):
            self._fail(f"fewer than {config.threshold} of this site's neighbourhood confirmed the survivor list")
        self_ids, key_ids = set(message.self_mask_ids), set(message.key_ids)
        both = self_ids & key_ids
        if both:
            self._violation(f"the coordinator asked for both shares of sites {sorted(both)}")
        if not self_ids <= self._survivors:
            self._violation(f"self-mask shares requested for non-survivors {sorted(self_ids - self._survivors)}")
        if key_ids & self._survivors:
            self._violation(f"key shares requested for survivors {sorted(key_ids & self._survivors)}")
        unheld = (self_ids | key_ids) - set(self._held)
        if unheld:
            self._violation(f"shares requested for sites {sorted(unheld)} whose shares this site does not hold")
            self_ids, key_ids = self_ids - unheld, key_ids - unheld
        if self._enforce:
            self._check_certificates(certificates, self_ids, key_ids, message)
        mask_shares = tuple(RevealedShare(o, self._held[o][1]) for o in sorted(self_ids))
        key_shares = tuple(RevealedShare(o, self._held[o][0]) for o in sorted(key_ids))
        self.state = ClientState.DONE
        self._forget_secrets()
        return UnmaskShares(
            round_id=config.round_id, config_digest=config.digest, sender=self.site_id,
            self_mask_shares=mask_shares, key_shares=key_shares,
        )

    def _check_survivor_signature(self, signer: int, signature: bytes) -> None:
        try:
            self._public(signer).verify(self._survivor_statement, signature)
        except InvalidSignatureError:
            self._fail(
                f"site {signer} signed a different survivor list (the coordinator showed "
                "different lists to different sites)"
            )

    def _check_confirmation(self, signer: int, tag: bytes) -> None:
        expected = confirmation_tag(
            self._pair_keys(signer)[1], statement=self._survivor_statement, signer=signer, peer=self.site_id
        )
        if not hmac.compare_digest(tag, expected):
            self._fail(
                f"site {signer} confirmed a different survivor list (the coordinator showed "
                "different lists to different sites)"
            )

    def _check_certificates(
        self, certificates: Certificates, self_ids: set[int], key_ids: set[int], message: UnmaskRequest
    ) -> None:
        """Rules R1 and R2 of :mod:`securefed.secagg.certification`."""
        assert self.config is not None
        attested = dict(message.attestations)
        for owner in sorted(self_ids - {self.site_id}):
            if not self.graph.complete:
                tag = attested.get(owner)
                expected = attestation_tag(
                    self._pair_keys(owner)[1], digest=self.config.digest, owner=owner, peer=self.site_id
                ) if owner in self._peers else None
                if tag is None or expected is None or not hmac.compare_digest(tag, expected):
                    self._fail(f"site {owner} did not attest masking against this site; its self-mask share stays secret")
            if not certificates.certified(owner):
                self._fail(f"the survivor list is not confirmed in site {owner}'s neighbourhood")
        for owner in sorted(key_ids):
            if not certificates.certified(owner):
                self._fail(f"the survivor list is not confirmed in dropped site {owner}'s neighbourhood")

    # state bookkeeping: every successful handler advances one state
    _NEXT = {
        ClientState.NEW: ClientState.ADVERTISED,
        ClientState.ADVERTISED: ClientState.SHARED,
        ClientState.SHARED: ClientState.MASKED,
        ClientState.MASKED: ClientState.CONFIRMED,
    }
