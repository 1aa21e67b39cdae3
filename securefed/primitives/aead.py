"""Authenticated encryption: XChaCha20-Poly1305 (IETF) from libsodium.

The 24-byte nonce is drawn at random for every message, which is safe with XChaCha's long
nonce; the sealed form is ``nonce || ciphertext || tag``.
"""

from __future__ import annotations

import nacl.bindings
import nacl.exceptions

from securefed.errors import CryptoError, DecryptionError
from securefed.primitives.randomness import RandomSource

__all__ = ["KEY_SIZE", "NONCE_SIZE", "TAG_SIZE", "seal", "open_sealed"]

KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16

_Bytes = bytes | bytearray | memoryview


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes, rng: RandomSource) -> bytes:
    """Encrypt and authenticate ``plaintext``, binding ``associated_data``; return nonce||ct."""
    if not isinstance(key, _Bytes) or len(key) != KEY_SIZE:
        raise CryptoError(f"AEAD key must be {KEY_SIZE} bytes; got a key of the wrong size or type")
    if not isinstance(plaintext, _Bytes) or not isinstance(associated_data, _Bytes):
        raise CryptoError("plaintext and associated_data must be bytes")
    nonce = rng.random_bytes(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise CryptoError(
            f"random source returned {len(nonce)} bytes for a {NONCE_SIZE}-byte nonce"
        )
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        bytes(plaintext), bytes(associated_data), nonce, bytes(key)
    )
    return nonce + ciphertext


def open_sealed(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Verify and decrypt the output of :func:`seal`.

    Raises :class:`DecryptionError` for any failure: wrong key, wrong associated data,
    truncated input or any modified byte. The reason is deliberately not distinguished.
    """
    if not isinstance(key, _Bytes) or len(key) != KEY_SIZE:
        raise DecryptionError(
            f"AEAD key must be {KEY_SIZE} bytes; got a key of the wrong size or type"
        )
    if not isinstance(sealed, _Bytes) or not isinstance(associated_data, _Bytes):
        raise DecryptionError("sealed message and associated_data must be bytes")
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError(
            f"sealed message is {len(sealed)} bytes, shorter than the minimum "
            f"{NONCE_SIZE + TAG_SIZE} (nonce + tag)"
        )
    sealed = bytes(sealed)
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[NONCE_SIZE:], bytes(associated_data), sealed[:NONCE_SIZE], bytes(key)
        )
    except nacl.exceptions.CryptoError:
        raise DecryptionError(
            "message did not authenticate: wrong key, wrong associated data, or it was modified"
        ) from None
