"""X25519 key agreement, for the per-round keys parties exchange in secure aggregation."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions

from securefed.errors import CryptoError
from securefed.primitives.randomness import RandomSource

__all__ = ["AGREEMENT_KEY_SIZE", "AgreementKeyPair", "agree"]

AGREEMENT_KEY_SIZE = 32
_ALL_ZERO = bytes(AGREEMENT_KEY_SIZE)


def _is_key(value: object) -> bool:
    return isinstance(value, bytes | bytearray) and len(value) == AGREEMENT_KEY_SIZE


def agree(secret: bytes, peer_public: bytes) -> bytes:
    """Return the raw X25519 shared secret of ``secret`` and ``peer_public``.

    The result is not uniformly random: derive keys from it with :func:`hkdf_sha256`.
    Raises :class:`CryptoError` for a key of the wrong length or a low-order peer key
    (which would make the shared secret all zero, i.e. known to everyone).
    """
    if not _is_key(secret):
        raise CryptoError(f"X25519 secret key must be {AGREEMENT_KEY_SIZE} bytes")
    if not _is_key(peer_public):
        size = len(peer_public) if isinstance(peer_public, bytes | bytearray) else None
        raise CryptoError(
            f"peer public key must be {AGREEMENT_KEY_SIZE} bytes, got "
            f"{size if size is not None else type(peer_public).__name__}"
        )
    try:
        shared = nacl.bindings.crypto_scalarmult(bytes(secret), bytes(peer_public))
    except nacl.exceptions.CryptoError:
        # libsodium refuses exactly when the result would be all zero.
        shared = _ALL_ZERO
    if hmac.compare_digest(shared, _ALL_ZERO):
        raise CryptoError(
            "peer public key is a low-order point; refusing an all-zero shared secret"
        )
    return shared


@dataclass(frozen=True)
class AgreementKeyPair:
    """A fresh X25519 key pair, used for one round only."""

    secret: bytes = field(repr=False)
    public: bytes

    def __post_init__(self) -> None:
        if not _is_key(self.secret) or not _is_key(self.public):
            raise CryptoError(f"X25519 keys must be {AGREEMENT_KEY_SIZE} bytes each")
        object.__setattr__(self, "secret", bytes(self.secret))
        object.__setattr__(self, "public", bytes(self.public))
        expected = nacl.bindings.crypto_scalarmult_base(self.secret)
        if not hmac.compare_digest(expected, self.public):
            raise CryptoError("public key does not belong to the secret key of this key pair")

    @classmethod
    def generate(cls, rng: RandomSource) -> AgreementKeyPair:
        """Draw a new key pair from ``rng``."""
        return cls.from_secret(rng.random_bytes(AGREEMENT_KEY_SIZE))

    @classmethod
    def from_secret(cls, secret: bytes) -> AgreementKeyPair:
        """Rebuild the key pair of a 32-byte X25519 secret key."""
        if not _is_key(secret):
            raise CryptoError(f"X25519 secret key must be {AGREEMENT_KEY_SIZE} bytes")
        return cls(secret=bytes(secret), public=nacl.bindings.crypto_scalarmult_base(bytes(secret)))

    def agree(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared secret with ``peer_public``; see :func:`agree`."""
        return agree(self.secret, peer_public)
