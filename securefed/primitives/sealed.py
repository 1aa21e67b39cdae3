"""Anonymous public-key encryption to a site's long-term X25519 key (libsodium sealed boxes).

A sealed box is encrypted with a fresh ephemeral key, so only the holder of the recipient's
secret key can open it and the ciphertext says nothing about who sealed it: authenticate the
sender separately (the HE key dealer signs what it seals). Overhead: 48 bytes.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.public

from securefed.errors import DecryptionError
from securefed.primitives.identity import PublicIdentity, SiteIdentity

__all__ = ["seal_to", "open_sealed", "SEAL_OVERHEAD"]

SEAL_OVERHEAD = 48  # ephemeral public key (32) + Poly1305 tag (16)


def seal_to(recipient: PublicIdentity, message: bytes) -> bytes:
    """Encrypt ``message`` so that only ``recipient`` (its X25519 key from the roster) can read it."""
    return nacl.public.SealedBox(nacl.public.PublicKey(recipient.encryption_key)).encrypt(bytes(message))


def open_sealed(identity: SiteIdentity, sealed: bytes) -> bytes:
    """Open a box sealed to ``identity``; :class:`DecryptionError` if it was not, or was altered."""
    try:
        return nacl.public.SealedBox(nacl.public.PrivateKey(identity.encryption_secret)).decrypt(bytes(sealed))
    except (nacl.exceptions.CryptoError, TypeError, ValueError):
        raise DecryptionError(f"a sealed box did not open with the key of site {identity.name!r}: it was "
                              "sealed to another site or altered on the way") from None
