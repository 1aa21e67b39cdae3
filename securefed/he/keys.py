"""Delivering the CKKS secret context to the sites, and only to them.

A key dealer (a designated site, or the federation's administrator offline) creates the CKKS
context with its secret key. For each site it seals the serialized secret context to the site's
X25519 key from the roster (:mod:`securefed.primitives.sealed`) and signs, with its own Ed25519
roster key, a statement binding the run, the recipient, the digest of the secret context and the
digest of the public context (the one without the secret key, which is all the coordinator gets).

A site accepts a delivery only if the dealer is in the roster and signed it, the delivery names
this site and this run, the box opens with its own key, and what it opens hashes to the signed
digest. Every site signs the same digests, so sites that compare them (they are in each round's
configuration) know they all hold the same key; the coordinator, holding only the public context
and the sealed boxes, can neither decrypt nor read the key. No I/O here and no TenSEAL: contexts
are bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from securefed.errors import InvalidSignatureError, MalformedMessageError, ProtocolAbort
from securefed.primitives.identity import SiteIdentity
from securefed.primitives.roster import Roster
from securefed.primitives.sealed import open_sealed, seal_to
from securefed.serialization import Reader, Writer

__all__ = ["SealedContext", "seal_context", "open_context", "context_digest", "key_id", "RUN_ID_SIZE"]

RUN_ID_SIZE = 16
_MAGIC = b"SFHK"
_VERSION = 1
_DOMAIN = b"securefed/he/context-delivery/v1"
_MAX_NAME = 256
_MAX_SEALED = 1 << 30


def context_digest(context: bytes) -> bytes:
    """SHA-256 of a serialized context: what the parties compare to know they share one key."""
    return hashlib.sha256(bytes(context)).digest()


def key_id(run_id: bytes, secret_digest: bytes, public_digest: bytes) -> bytes:
    """What names one run's key in uploads and round setups.

    The public context holds the parameters but no key material, so its digest is the same for
    every key with those parameters; the id binds the run and the secret context's digest too, so
    a ciphertext under an earlier run's key is refused instead of silently corrupting the sum.
    """
    return hashlib.sha256(b"securefed/he/key-id/v1" + bytes(run_id) + bytes(secret_digest)
                          + bytes(public_digest)).digest()


@dataclass(frozen=True)
class SealedContext:
    """One site's copy of the secret context: sealed to that site, signed by the dealer."""

    run_id: bytes
    site: str
    dealer: str
    secret_digest: bytes  # SHA-256 of the secret context inside the box
    public_digest: bytes  # SHA-256 of the public context the coordinator receives
    sealed: bytes
    signature: bytes = b""

    def _fields(self, w: Writer) -> Writer:
        w.fixed(self.run_id, RUN_ID_SIZE).blob(self.site.encode()).blob(self.dealer.encode())
        return w.fixed(self.secret_digest, 32).fixed(self.public_digest, 32)

    def statement(self) -> bytes:
        """What the dealer signs: everything but the signature (the box by its hash), domain-labelled."""
        return self._fields(Writer().blob(_DOMAIN)).fixed(hashlib.sha256(self.sealed).digest(), 32).getvalue()

    def encode(self) -> bytes:
        w = self._fields(Writer().fixed(_MAGIC, 4).u8(_VERSION))
        return w.blob(self.sealed).fixed(self.signature, 64).getvalue()

    @classmethod
    def decode(cls, data: bytes) -> SealedContext:
        r = Reader(data, what="sealed HE context")
        r.header(_MAGIC, _VERSION, kind="sealed HE context")
        run_id = r.fixed(RUN_ID_SIZE, "run id")
        try:
            site = r.blob("site", max_size=_MAX_NAME).decode()
            dealer = r.blob("dealer", max_size=_MAX_NAME).decode()
        except UnicodeDecodeError:
            raise MalformedMessageError("sealed HE context: a name is not UTF-8") from None
        secret_digest, public_digest = r.fixed(32, "secret digest"), r.fixed(32, "public digest")
        sealed = r.blob("sealed context", max_size=_MAX_SEALED)
        signature = r.fixed(64, "signature")
        r.finish()
        return cls(run_id, site, dealer, secret_digest, public_digest, sealed, signature)


def seal_context(*, dealer: SiteIdentity, roster: Roster, secret_context: bytes, public_context: bytes,
                 run_id: bytes) -> dict[str, SealedContext]:
    """Seal ``secret_context`` to every site of ``roster`` and sign each delivery as ``dealer``."""
    if len(run_id) != RUN_ID_SIZE:
        raise ProtocolAbort(f"run_id must be {RUN_ID_SIZE} bytes (draw it at random for every run)")
    if dealer.name not in roster:
        raise ProtocolAbort(f"the dealer {dealer.name!r} is not in the federation roster")
    secret_digest, public_digest = context_digest(secret_context), context_digest(public_context)
    deliveries = {}
    for name in roster.names:
        unsigned = SealedContext(bytes(run_id), name, dealer.name, secret_digest, public_digest,
                                 seal_to(roster[name], secret_context))
        deliveries[name] = SealedContext(unsigned.run_id, name, dealer.name, secret_digest, public_digest,
                                         unsigned.sealed, dealer.sign(unsigned.statement()))
    return deliveries


def open_context(delivery: SealedContext, *, identity: SiteIdentity, roster: Roster, dealer: str,
                 run_id: bytes, public_digest: bytes | None = None) -> bytes:
    """Check ``delivery`` and return the secret context inside it (bytes).

    Raises :class:`InvalidSignatureError` when the agreed ``dealer`` did not sign it,
    :class:`~securefed.errors.DecryptionError` when the box is not this site's or was altered,
    and :class:`ProtocolAbort` for a delivery meant for another site or run, or whose contents
    do not match what was signed (or, given ``public_digest``, another key than the federation's).
    """
    if delivery.dealer != dealer or dealer not in roster:
        raise InvalidSignatureError(f"the delivery names dealer {delivery.dealer!r}; the federation's dealer "
                                    f"is {dealer!r} and must be in the roster")
    roster[dealer].verify(delivery.statement(), delivery.signature)
    if delivery.site != identity.name:
        raise ProtocolAbort(f"this delivery is for site {delivery.site!r}, not {identity.name!r}")
    if delivery.run_id != bytes(run_id):
        raise ProtocolAbort("this delivery is for another run: a key from an earlier run is refused")
    if public_digest is not None and delivery.public_digest != public_digest:
        raise ProtocolAbort("this delivery's public context is not the one the federation agreed on")
    secret = open_sealed(identity, delivery.sealed)
    if context_digest(secret) != delivery.secret_digest:
        raise ProtocolAbort("the sealed context does not match the digest the dealer signed")
    return secret
