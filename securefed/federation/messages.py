"""The federation's own messages, wrapped around the secure-aggregation ones.

Every message between the coordinator and a site is bytes in this versioned, length-checked
format (no pickle). The coordinator sends :class:`RoundStart` (the global model and, under secure
aggregation, the protocol's setup message), relays protocol messages in :class:`ProtocolRelay`,
and announces each new global model in :class:`ModelRelease`. A site answers with a relay, a
:class:`PlainUpdate` (the non-private baseline only), a :class:`SiteRefusal` or an
:class:`Acknowledgement`. Under homomorphic encryption the coordinator also asks the key dealer
for the sealed CKKS key (:class:`KeyRequest`, answered by :class:`KeyDeal`), hands each site its
sealed copy (:class:`KeyDelivery`), relays encrypted uploads and sends the encrypted sum back to
every site (:class:`EncryptedAggregate`); each site that checked it vouches for it with a signed
:class:`SumReceipt`, and applies it only on a :class:`SumConfirmation` that a majority of the
roster vouched for the same sum. Nothing else ever reaches the coordinator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from securefed.errors import MalformedMessageError
from securefed.serialization import Reader, Writer

__all__ = [
    "Acknowledgement",
    "EncryptedAggregate",
    "FederationMessage",
    "KeyDeal",
    "KeyDelivery",
    "KeyRequest",
    "ModelRelease",
    "PlainUpdate",
    "ProtocolRelay",
    "RoundStart",
    "SiteRefusal",
    "SumConfirmation",
    "SumReceipt",
    "decode_federation_message",
    "majority",
    "message_kind",
    "model_digest",
    "AGGREGATION_CODES",
]

_MAGIC = b"SFFD"
WIRE_VERSION = 1
MAX_TEXT = 4096
MAX_SITES = 1 << 16
MAX_HE_CIPHERTEXTS = 1 << 16
MAX_HE_BLOB = 1 << 24  # one ciphertext, one sealed context or one public context
_RELAY_PAD = 6  # header (6) + round (8) + pad (6) + length (4) = 24: the payload is 8-byte aligned
AGGREGATION_CODES = {"plain": 0, "secagg": 1, "he": 2}


def model_digest(vector: np.ndarray) -> bytes:
    """SHA-256 of a flat float32 model vector (little-endian), naming the model a round trains."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<f4").tobytes()).digest()


def _header(kind: int) -> Writer:
    return Writer().fixed(_MAGIC, 4).u8(WIRE_VERSION).u8(kind)


def _text(w: Writer, text: str) -> Writer:
    return w.blob(text.encode("utf-8")[:MAX_TEXT])


def _read_text(r: Reader, field: str) -> str:
    try:
        return r.blob(field, max_size=MAX_TEXT).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessageError(f"federation message: {field} is not UTF-8") from None


def _f32(r: Reader, field: str) -> np.ndarray:
    values = r.array(field)
    if values.dtype != np.dtype("<f4"):
        raise MalformedMessageError(f"federation message: {field} must be float32, got {values.dtype}")
    return values


@dataclass(frozen=True, eq=False)
class RoundStart:
    """Coordinator -> site: train round ``round`` from ``model`` and join protocol round ``protocol_round``."""

    KIND = 1
    round: int
    protocol_round: int
    aggregation: str  # "plain" | "secagg" | "he"
    model: np.ndarray  # float32, the global model the round starts from
    setup: bytes  # the secure-aggregation RoundSetup message (empty for plain)

    def encode(self) -> bytes:
        w = _header(self.KIND).u32(self.round).u64(self.protocol_round).u8(AGGREGATION_CODES[self.aggregation])
        return w.array(np.ascontiguousarray(self.model, dtype="<f4")).blob(self.setup).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> RoundStart:
        round_, protocol_round, code = r.u32("round"), r.u64("protocol round"), r.u8("aggregation")
        names = {v: k for k, v in AGGREGATION_CODES.items()}
        if code not in names:
            raise MalformedMessageError(f"federation message: unknown aggregation code {code}")
        return cls(round_, protocol_round, names[code], _f32(r, "model"), r.blob("setup"))


@dataclass(frozen=True, eq=False)
class ProtocolRelay:
    """Either direction: one secure-aggregation message, as bytes, for round ``protocol_round``.

    The payload starts 8-byte aligned in the encoding and is decoded as a read-only view of it,
    so a multi-megabyte masked input is not copied on its way through.
    """

    KIND = 2
    protocol_round: int
    payload: bytes | memoryview

    def encode(self) -> bytes:
        header = _header(self.KIND).u64(self.protocol_round).fixed(bytes(_RELAY_PAD), _RELAY_PAD)
        return header.blob(self.payload).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> ProtocolRelay:
        protocol_round = r.u64("protocol round")
        if any(r.fixed(_RELAY_PAD, "padding")):
            raise MalformedMessageError("federation message: the relay's padding is not zero")
        return cls(protocol_round, r.blob_view("payload"))


@dataclass(frozen=True, eq=False)
class PlainUpdate:
    """Site -> coordinator, non-private baseline only: the update itself, in the clear."""

    KIND = 3
    round: int
    weight: float
    update: np.ndarray

    def encode(self) -> bytes:
        w = _header(self.KIND).u32(self.round).f64(self.weight)
        return w.array(np.ascontiguousarray(self.update, dtype="<f4")).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> PlainUpdate:
        return cls(r.u32("round"), r.f64("weight"), _f32(r, "update"))


@dataclass(frozen=True, eq=False)
class SiteRefusal:
    """Site -> coordinator: the site will not take part in ``round`` (a short public reason)."""

    KIND = 4
    round: int
    reason: str

    def encode(self) -> bytes:
        return _text(_header(self.KIND).u32(self.round), self.reason).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> SiteRefusal:
        return cls(r.u32("round"), _read_text(r, "reason"))


@dataclass(frozen=True, eq=False)
class ModelRelease:
    """Coordinator -> site: the global model after ``round`` (0: the initial model)."""

    KIND = 5
    round: int
    model: np.ndarray

    def encode(self) -> bytes:
        return _header(self.KIND).u32(self.round).array(np.ascontiguousarray(self.model, dtype="<f4")).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> ModelRelease:
        return cls(r.u32("round"), _f32(r, "model"))


@dataclass(frozen=True, eq=False)
class Acknowledgement:
    """Site -> coordinator: received (carries nothing about the site's data)."""

    KIND = 6
    round: int

    def encode(self) -> bytes:
        return _header(self.KIND).u32(self.round).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> Acknowledgement:
        return cls(r.u32("round"))


@dataclass(frozen=True, eq=False)
class KeyRequest:
    """Coordinator -> the key dealer: make this run's CKKS key and seal it to every site."""

    KIND = 7
    run_id: bytes

    def encode(self) -> bytes:
        return _header(self.KIND).blob(self.run_id).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> KeyRequest:
        return cls(r.blob("run id", max_size=64))


@dataclass(frozen=True, eq=False)
class KeyDeal:
    """The key dealer -> coordinator: the public context (no secret key) and each site's sealed
    copy of the secret context, signed by the dealer (:class:`securefed.he.SealedContext` bytes)."""

    KIND = 8
    public_context: bytes
    deliveries: dict[str, bytes]

    def encode(self) -> bytes:
        w = _header(self.KIND).blob(self.public_context).u32(len(self.deliveries))
        for site, sealed in sorted(self.deliveries.items()):
            _text(w, site).blob(sealed)
        return w.getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> KeyDeal:
        public = r.blob("public context", max_size=MAX_HE_BLOB)
        count = r.count("deliveries", item_size=8, max_count=MAX_SITES)
        deliveries = {}
        for _ in range(count):
            site = _read_text(r, "site")
            deliveries[site] = r.blob("sealed context", max_size=MAX_HE_BLOB)
        return cls(public, deliveries)


@dataclass(frozen=True, eq=False)
class KeyDelivery:
    """Coordinator -> site: its sealed copy of the run's secret context, and the public context."""

    KIND = 9
    run_id: bytes
    public_context: bytes
    sealed: bytes

    def encode(self) -> bytes:
        return _header(self.KIND).blob(self.run_id).blob(self.public_context).blob(self.sealed).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> KeyDelivery:
        return cls(r.blob("run id", max_size=64), r.blob("public context", max_size=MAX_HE_BLOB),
                   r.blob("sealed context", max_size=MAX_HE_BLOB))


@dataclass(frozen=True, eq=False)
class EncryptedAggregate:
    """Coordinator -> every site: the encrypted sum of round ``round``, which started from the
    model after ``model_round`` (the one whose keyed tag is ``model_tag``), and the roster indices
    of the sites in it. Only sites can decrypt it; each applies it to the model it holds."""

    KIND = 10
    round: int
    model_round: int
    survivors: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]
    model_tag: bytes = bytes(32)

    def digest(self) -> bytes:
        """What sites vouch for: the round, the model round and tag, the survivors, every ciphertext."""
        h = hashlib.sha256(b"securefed/he/sum/v1")
        h.update(Writer().u32(self.round).u32(self.model_round).fixed(self.model_tag, 32)
                 .u32_list(list(self.survivors)).getvalue())
        for ciphertext in self.ciphertexts:
            h.update(hashlib.sha256(ciphertext).digest())
        return h.digest()

    def encode(self) -> bytes:
        w = _header(self.KIND).u32(self.round).u32(self.model_round).u32_list(list(self.survivors))
        w.fixed(self.model_tag, 32).u32(len(self.ciphertexts))
        for ciphertext in self.ciphertexts:
            w.blob(ciphertext)
        return w.getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> EncryptedAggregate:
        round_, model_round = r.u32("round"), r.u32("model round")
        survivors = r.u32_list("survivors", max_count=MAX_SITES)
        model_tag = r.fixed(32, "model tag")
        count = r.count("ciphertexts", item_size=4, max_count=MAX_HE_CIPHERTEXTS)
        return cls(round_, model_round, survivors,
                   tuple(r.blob("ciphertext", max_size=MAX_HE_BLOB) for _ in range(count)), model_tag)


def majority(roster_size: int) -> int:
    """Receipts a sum needs before any site decrypts it: a majority of the roster, so that two
    different sums (each vouched for by its own majority) would need a site vouching for both."""
    return roster_size // 2 + 1


def sum_statement(round_: int, digest: bytes) -> bytes:
    """What a site signs to vouch for a round's sum (it vouches for one sum per model it holds)."""
    return Writer().blob(b"securefed/he/sum-receipt/v1").u32(round_).fixed(digest, 32).getvalue()


@dataclass(frozen=True, eq=False)
class SumReceipt:
    """Site -> coordinator: "I checked round ``round``'s sum with this digest", signed."""

    KIND = 11
    round: int
    digest: bytes
    signature: bytes

    def encode(self) -> bytes:
        return _header(self.KIND).u32(self.round).fixed(self.digest, 32).fixed(self.signature, 64).getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> SumReceipt:
        return cls(r.u32("round"), r.fixed(32, "digest"), r.fixed(64, "signature"))


@dataclass(frozen=True, eq=False)
class SumConfirmation:
    """Coordinator -> sites: the receipts (roster index -> signature) for round ``round``'s sum."""

    KIND = 12
    round: int
    digest: bytes
    signatures: dict[int, bytes]

    def encode(self) -> bytes:
        w = _header(self.KIND).u32(self.round).fixed(self.digest, 32).u32(len(self.signatures))
        for site, signature in sorted(self.signatures.items()):
            w.u32(site).fixed(signature, 64)
        return w.getvalue()

    @classmethod
    def _decode(cls, r: Reader) -> SumConfirmation:
        round_, digest = r.u32("round"), r.fixed(32, "digest")
        count = r.count("signatures", item_size=68, max_count=MAX_SITES)
        signatures = {}
        for _ in range(count):
            site = r.u32("site")
            signatures[site] = r.fixed(64, "signature")
        return cls(round_, digest, signatures)


FederationMessage = (RoundStart | ProtocolRelay | PlainUpdate | SiteRefusal | ModelRelease | Acknowledgement
                     | KeyRequest | KeyDeal | KeyDelivery | EncryptedAggregate | SumReceipt | SumConfirmation)
_BY_KIND = {cls.KIND: cls for cls in (RoundStart, ProtocolRelay, PlainUpdate, SiteRefusal, ModelRelease, Acknowledgement,
                                      KeyRequest, KeyDeal, KeyDelivery, EncryptedAggregate, SumReceipt,
                                      SumConfirmation)}


def decode_federation_message(data: bytes) -> FederationMessage:
    """Decode one federation message, or raise MalformedMessageError saying why not."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessageError(f"federation message must be bytes, got {type(data).__name__}")
    r = Reader(data, what="federation message")
    r.header(_MAGIC, WIRE_VERSION, kind="federation message")
    kind = r.u8("kind")
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise MalformedMessageError(f"unknown federation message kind {kind}")
    message = cls._decode(r)
    r.finish()
    return message


def message_kind(data: bytes) -> str:
    """The kind of a federation message from its header alone (relays: the protocol message's kind).

    For transcripts and logs: cheap, never raises, and reads nothing beyond the headers.
    """
    view = bytes(data[:64])
    if len(view) < 6 or view[:4] != _MAGIC:
        return "malformed"
    cls = _BY_KIND.get(view[5])
    if cls is None:
        return "malformed"
    if cls is ProtocolRelay:
        inner = view[6 + 8 + _RELAY_PAD + 4:]  # after the header, the round, the padding and the length
        if inner[:4] == b"SFHE":
            return "ProtocolRelay/EncryptedUpload"
        from securefed.secagg.messages import message_kind_name

        return f"ProtocolRelay/{message_kind_name(inner)}"
    return cls.__name__
