"""Immutable protocol messages and their versioned byte encoding.

Every message starts with the same header: magic ``SFSA``, format version, message kind, the
round id and the digest of the round configuration. Decoding checks all of it, plus every length,
and raises :class:`~securefed.errors.MalformedMessageError` on anything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from securefed.errors import MalformedMessageError
from securefed.secagg.config import MAX_SITES, MAX_VECTOR_LENGTH, RoundConfig
from securefed.secagg.stages import Stage
from securefed.serialization import DEFAULT_MAX_MESSAGE_BYTES, Reader, Writer

__all__ = [
    "WIRE_VERSION",
    "RoundSetup",
    "KeyAdvertisement",
    "KeyDirectory",
    "EncryptedShare",
    "ShareBundle",
    "ShareDelivery",
    "MaskedInput",
    "MaskingAttestation",
    "SurvivorList",
    "ConsistencySignature",
    "UnmaskRequest",
    "RevealedShare",
    "UnmaskShares",
    "ServerMessage",
    "ClientMessage",
    "Message",
    "decode_message",
    "message_kind_name",
    "advertisement_statement",
    "survivors_statement",
]

WIRE_VERSION = 1
_MAGIC = b"SFSA"
_KEY = 32
_SIG = 64
_MAX_SHARE_BYTES = 4096
_TAG = 16  # masking.ATTESTATION_TAG_BYTES


def advertisement_statement(digest: bytes, sender: int, encryption_key: bytes, masking_key: bytes) -> bytes:
    """What a client signs when it advertises its round keys: bound to this round's config."""
    return b"securefed/secagg/v1/advertise" + digest + sender.to_bytes(4, "little") + encryption_key + masking_key


def survivors_statement(digest: bytes, survivors: tuple[int, ...]) -> bytes:
    """What a client signs in the consistency check: the exact survivor set it was shown."""
    listed = np.asarray(survivors, dtype="<u4").tobytes()
    return b"securefed/secagg/v1/survivors" + digest + hashlib.sha256(listed).digest()


def _header(kind: int, round_id: int, digest: bytes) -> Writer:
    return Writer().fixed(_MAGIC, 4).u8(WIRE_VERSION).u8(kind).u64(round_id).fixed(digest, 32)


@dataclass(frozen=True)
class _Base:
    KIND: ClassVar[int]
    STAGE: ClassVar[Stage]
    round_id: int
    config_digest: bytes


def _ids_in_range(ids: tuple[int, ...], what: str) -> None:
    if len(set(ids)) != len(ids):
        raise MalformedMessageError(f"{what} lists a site more than once")


# ---------------------------------------------------------------- server -> client messages
@dataclass(frozen=True)
class RoundSetup(_Base):
    """Opens a round: the configuration every client checks and then binds into its signatures."""

    KIND: ClassVar[int] = 1
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    config: RoundConfig

    @classmethod
    def for_config(cls, config: RoundConfig) -> RoundSetup:
        return cls(round_id=config.round_id, config_digest=config.digest, config=config)

    def encode(self) -> bytes:
        return _header(self.KIND, self.round_id, self.config_digest).blob(self.config.encode()).getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> RoundSetup:
        config = RoundConfig.decode(r.blob("round configuration", max_size=8 * MAX_SITES + 4096))
        if config.digest != digest or config.round_id != round_id:
            raise MalformedMessageError("round setup: header does not match the enclosed configuration")
        return cls(round_id=round_id, config_digest=digest, config=config)


@dataclass(frozen=True)
class KeyAdvertisement(_Base):
    """A client's two fresh X25519 public keys, signed with its long-term Ed25519 key."""

    KIND: ClassVar[int] = 2
    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    sender: int
    encryption_key: bytes
    masking_key: bytes
    signature: bytes

    def statement(self) -> bytes:
        return advertisement_statement(self.config_digest, self.sender, self.encryption_key, self.masking_key)

    def _write_body(self, w: Writer) -> Writer:
        return w.u32(self.sender).fixed(self.encryption_key, _KEY).fixed(self.masking_key, _KEY).fixed(self.signature, _SIG)

    def encode(self) -> bytes:
        return self._write_body(_header(self.KIND, self.round_id, self.config_digest)).getvalue()

    @classmethod
    def _read_body(cls, r: Reader, round_id: int, digest: bytes) -> KeyAdvertisement:
        return cls(
            round_id=round_id,
            config_digest=digest,
            sender=r.u32("sender"),
            encryption_key=r.fixed(_KEY, "encryption key"),
            masking_key=r.fixed(_KEY, "masking key"),
            signature=r.fixed(_SIG, "signature"),
        )

    _decode = _read_body


_AD_SIZE = 4 + _KEY + _KEY + _SIG


@dataclass(frozen=True)
class KeyDirectory(_Base):
    """The coordinator relays the advertisements of a client's neighbours."""

    KIND: ClassVar[int] = 3
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    entries: tuple[KeyAdvertisement, ...]

    def encode(self) -> bytes:
        w = _header(self.KIND, self.round_id, self.config_digest).u32(len(self.entries))
        for ad in self.entries:
            ad._write_body(w)
        return w.getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> KeyDirectory:
        n = r.count("advertisements", item_size=_AD_SIZE, max_count=MAX_SITES)
        entries = tuple(KeyAdvertisement._read_body(r, round_id, digest) for _ in range(n))
        _ids_in_range(tuple(e.sender for e in entries), "key directory")
        return cls(round_id=round_id, config_digest=digest, entries=entries)


@dataclass(frozen=True)
class EncryptedShare:
    sender: int
    recipient: int
    ciphertext: bytes


def _write_shares(w: Writer, items: tuple[EncryptedShare, ...]) -> Writer:
    w.u32(len(items))
    for item in items:
        w.u32(item.sender).u32(item.recipient).blob(item.ciphertext)
    return w


def _read_shares(r: Reader) -> tuple[EncryptedShare, ...]:
    n = r.count("encrypted shares", item_size=12, max_count=MAX_SITES)
    return tuple(
        EncryptedShare(r.u32("sender"), r.u32("recipient"), r.blob("ciphertext", max_size=_MAX_SHARE_BYTES))
        for _ in range(n)
    )


@dataclass(frozen=True)
class ShareBundle(_Base):
    """A client's Shamir shares, each encrypted to the neighbour that will hold it."""

    KIND: ClassVar[int] = 4
    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    sender: int
    items: tuple[EncryptedShare, ...]

    def encode(self) -> bytes:
        return _write_shares(_header(self.KIND, self.round_id, self.config_digest).u32(self.sender), self.items).getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> ShareBundle:
        sender = r.u32("sender")
        items = _read_shares(r)
        _ids_in_range(tuple(i.recipient for i in items), "share bundle")
        return cls(round_id=round_id, config_digest=digest, sender=sender, items=items)


@dataclass(frozen=True)
class ShareDelivery(_Base):
    """The coordinator forwards to a client the encrypted shares addressed to it."""

    KIND: ClassVar[int] = 5
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    items: tuple[EncryptedShare, ...]

    def encode(self) -> bytes:
        return _write_shares(_header(self.KIND, self.round_id, self.config_digest), self.items).getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> ShareDelivery:
        items = _read_shares(r)
        _ids_in_range(tuple(i.sender for i in items), "share delivery")
        return cls(round_id=round_id, config_digest=digest, items=items)


@dataclass(frozen=True)
class MaskingAttestation:
    """The peers a client masked against, each with a MAC tag under a key only that peer shares
    with it, so each peer can check the claim about itself (see certification.py)."""

    owner: int
    tags: tuple[tuple[int, bytes], ...]  # (peer, tag)

    @property
    def masked_with(self) -> tuple[int, ...]:
        return tuple(peer for peer, _ in self.tags)


def _write_attestation(w: Writer, a: MaskingAttestation) -> Writer:
    w.u32(a.owner).u32(len(a.tags))
    for peer, tag in a.tags:
        w.u32(peer).fixed(tag, _TAG)
    return w


def _read_attestation(r: Reader) -> MaskingAttestation:
    owner = r.u32("attestation owner")
    n = r.count("attestation tags", item_size=4 + _TAG, max_count=MAX_SITES)
    tags = tuple((r.u32("peer"), r.fixed(_TAG, "tag")) for _ in range(n))
    _ids_in_range(tuple(p for p, _ in tags), "masking attestation")
    return MaskingAttestation(owner, tags)


@dataclass(frozen=True, eq=False)
class MaskedInput(_Base):
    """A client's masked, fixed-point input (with its masked weight in the last slot)."""

    KIND: ClassVar[int] = 6
    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    sender: int
    values: np.ndarray
    attestation: MaskingAttestation | None = None

    def encode(self) -> bytes:
        w = _header(self.KIND, self.round_id, self.config_digest).u32(self.sender).array(self.values)
        if self.attestation is None:  # complete graph: the attestation is not needed
            return w.u8(0).getvalue()
        return _write_attestation(w.u8(1), self.attestation).getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> MaskedInput:
        sender = r.u32("sender")
        values = r.array("masked values", max_elements=MAX_VECTOR_LENGTH + 1)
        if values.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
            raise MalformedMessageError(f"masked input: values must be uint32 or uint64, got {values.dtype}")
        flag = r.u8("attestation flag")
        if flag not in (0, 1):
            raise MalformedMessageError(f"masked input: attestation flag must be 0 or 1, got {flag}")
        attestation = _read_attestation(r) if flag else None
        if attestation is not None and attestation.owner != sender:
            raise MalformedMessageError("masked input: the attestation names another site")
        return cls(round_id=round_id, config_digest=digest, sender=sender, values=values, attestation=attestation)


@dataclass(frozen=True)
class SurvivorList(_Base):
    """The coordinator announces which clients sent a masked input (U3)."""

    KIND: ClassVar[int] = 7
    STAGE: ClassVar[Stage] = Stage.CONSISTENCY_CHECK
    survivors: tuple[int, ...]

    def encode(self) -> bytes:
        return _header(self.KIND, self.round_id, self.config_digest).u32_list(list(self.survivors)).getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> SurvivorList:
        survivors = r.u32_list("survivors", max_count=MAX_SITES)
        _ids_in_range(survivors, "survivor list")
        return cls(round_id=round_id, config_digest=digest, survivors=survivors)


@dataclass(frozen=True)
class ConsistencySignature(_Base):
    """A client's signature over the survivor list it was shown, plus a MAC tag of the same list
    for each neighbour on it (cheaper for them to check than the signature)."""

    KIND: ClassVar[int] = 8
    STAGE: ClassVar[Stage] = Stage.CONSISTENCY_CHECK
    sender: int
    signature: bytes
    tags: tuple[tuple[int, bytes], ...] = ()  # (neighbour, tag)

    def encode(self) -> bytes:
        w = _header(self.KIND, self.round_id, self.config_digest).u32(self.sender).fixed(self.signature, _SIG)
        return _write_tags(w, self.tags).getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> ConsistencySignature:
        sender, signature = r.u32("sender"), r.fixed(_SIG, "signature")
        tags = _read_tags(r, "confirmation tags")
        return cls(round_id=round_id, config_digest=digest, sender=sender, signature=signature, tags=tags)


def _write_tags(w: Writer, tags: tuple[tuple[int, bytes], ...]) -> Writer:
    w.u32(len(tags))
    for site, tag in tags:
        w.u32(site).fixed(tag, _TAG)
    return w


def _read_tags(r: Reader, what: str) -> tuple[tuple[int, bytes], ...]:
    n = r.count(what, item_size=4 + _TAG, max_count=MAX_SITES)
    tags = tuple((r.u32("site"), r.fixed(_TAG, "tag")) for _ in range(n))
    _ids_in_range(tuple(site for site, _ in tags), what)
    return tags


@dataclass(frozen=True)
class UnmaskRequest(_Base):
    """The coordinator relays survivor signatures (and, in a sparse graph, the masking
    attestations of the survivors whose self-mask shares it asks for) and names the shares."""

    KIND: ClassVar[int] = 9
    STAGE: ClassVar[Stage] = Stage.UNMASK
    signatures: tuple[tuple[int, bytes], ...]
    self_mask_ids: tuple[int, ...]
    key_ids: tuple[int, ...]
    attestations: tuple[tuple[int, bytes], ...] = ()  # (owner, the owner's tag for this holder)
    confirmations: tuple[tuple[int, bytes], ...] = ()  # (neighbour, its list tag for this holder)

    def encode(self) -> bytes:
        w = _header(self.KIND, self.round_id, self.config_digest).u32(len(self.signatures))
        for signer, sig in self.signatures:
            w.u32(signer).fixed(sig, _SIG)
        w.u32_list(list(self.self_mask_ids)).u32_list(list(self.key_ids))
        return _write_tags(_write_tags(w, self.attestations), self.confirmations).getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> UnmaskRequest:
        n = r.count("signatures", item_size=4 + _SIG, max_count=MAX_SITES)
        sigs = tuple((r.u32("signer"), r.fixed(_SIG, "signature")) for _ in range(n))
        _ids_in_range(tuple(s for s, _ in sigs), "unmask request signatures")
        self_ids = r.u32_list("self-mask ids", max_count=MAX_SITES)
        key_ids = r.u32_list("key ids", max_count=MAX_SITES)
        _ids_in_range(self_ids, "unmask request self-mask ids")
        _ids_in_range(key_ids, "unmask request key ids")
        attestations = _read_tags(r, "unmask request attestations")
        confirmations = _read_tags(r, "unmask request confirmations")
        return cls(round_id=round_id, config_digest=digest, signatures=sigs, self_mask_ids=self_ids,
                   key_ids=key_ids, attestations=attestations, confirmations=confirmations)


@dataclass(frozen=True)
class RevealedShare:
    owner: int
    share: bytes


@dataclass(frozen=True)
class UnmaskShares(_Base):
    """A client's answer: self-mask shares of survivors, key shares of dropped sites."""

    KIND: ClassVar[int] = 10
    STAGE: ClassVar[Stage] = Stage.UNMASK
    sender: int
    self_mask_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]

    def encode(self) -> bytes:
        w = _header(self.KIND, self.round_id, self.config_digest).u32(self.sender)
        for group in (self.self_mask_shares, self.key_shares):
            w.u32(len(group))
            for item in group:
                w.u32(item.owner).blob(item.share)
        return w.getvalue()

    @classmethod
    def _decode(cls, r: Reader, round_id: int, digest: bytes) -> UnmaskShares:
        sender = r.u32("sender")
        groups = []
        for name in ("self-mask shares", "key shares"):
            n = r.count(name, item_size=8, max_count=MAX_SITES)
            groups.append(tuple(RevealedShare(r.u32("owner"), r.blob("share", max_size=_MAX_SHARE_BYTES)) for _ in range(n)))
            _ids_in_range(tuple(s.owner for s in groups[-1]), name)
        return cls(round_id=round_id, config_digest=digest, sender=sender, self_mask_shares=groups[0], key_shares=groups[1])


ServerMessage = Union[RoundSetup, KeyDirectory, ShareDelivery, SurvivorList, UnmaskRequest]
ClientMessage = Union[KeyAdvertisement, ShareBundle, MaskedInput, ConsistencySignature, UnmaskShares]
Message = Union[ServerMessage, ClientMessage]

_BY_KIND: dict[int, type] = {
    cls.KIND: cls
    for cls in (RoundSetup, KeyAdvertisement, KeyDirectory, ShareBundle, ShareDelivery, MaskedInput,
                SurvivorList, ConsistencySignature, UnmaskRequest, UnmaskShares)
}


def message_kind_name(data: bytes) -> str:
    """The class name of the message whose encoding starts ``data``, from its header alone."""
    head = bytes(data[:6])
    if len(head) < 6 or head[:4] != _MAGIC:
        return "malformed"
    cls = _BY_KIND.get(head[5])
    return cls.__name__ if cls is not None else "malformed"


def decode_message(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Decode any secure-aggregation message, or raise MalformedMessageError saying why not."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MalformedMessageError(f"message is {len(data)} bytes, more than the limit of {max_bytes}")
    r = Reader(data, what="secure-aggregation message")
    if r.fixed(4, "magic") != _MAGIC:
        raise MalformedMessageError("not a securefed secure-aggregation message (bad magic bytes)")
    version = r.u8("version")
    if version != WIRE_VERSION:
        raise MalformedMessageError(
            f"message format version {version} is not supported (this securefed speaks {WIRE_VERSION})"
        )
    kind = r.u8("kind")
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise MalformedMessageError(f"unknown message kind {kind}")
    round_id = r.u64("round id")
    digest = r.fixed(32, "config digest")
    try:
        message = cls._decode(r, round_id, digest)
    except MalformedMessageError:
        raise
    except (ValueError, OverflowError, TypeError) as exc:  # defence in depth for hostile bytes
        raise MalformedMessageError(f"{cls.__name__}: {exc}") from None
    r.finish()
    return message
