"""Derivations both sides of the protocol must compute identically.

Each derivation is domain-separated and bound to the round-configuration digest, so keys and
seeds from one round are useless in any other.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from securefed.errors import DecryptionError
from securefed.primitives.kdf import hkdf_sha256
from securefed.primitives.shamir import share_size

__all__ = [
    "attestation_key",
    "attestation_tag",
    "confirmation_tag",
    "ATTESTATION_TAG_BYTES",
    "pairwise_seed",
    "share_encryption_key",
    "share_associated_data",
    "encode_share_plaintext",
    "decode_share_plaintext",
    "SHARE_BYTES",
]

SHARE_BYTES = share_size(32)
ATTESTATION_TAG_BYTES = 16


def attestation_key(shared_secret: bytes, *, digest: bytes, a: int, b: int) -> bytes:
    """The MAC key of masking attestations between a and b: only those two sites can derive it."""
    low, high = (a, b) if a < b else (b, a)
    info = b"securefed/secagg/v1/masking-attestation" + struct.pack("<II", low, high)
    return hkdf_sha256(shared_secret, salt=digest, info=info)


def confirmation_tag(key: bytes, *, statement: bytes, signer: int, peer: int) -> bytes:
    """Signer's confirmation, readable only by peer, of the survivor list in ``statement``.

    It stands in for an Ed25519 signature between neighbours at a fraction of the cost, and as
    its key is fresh each round it cannot be replayed from another run."""
    message = b"securefed/secagg/v1/confirm" + statement + struct.pack("<II", signer, peer)
    return hmac.digest(key, message, hashlib.sha256)[:ATTESTATION_TAG_BYTES]


def attestation_tag(key: bytes, *, digest: bytes, owner: int, peer: int) -> bytes:
    """Owner's statement, readable only by peer, that owner applied a pairwise mask with peer."""
    message = b"securefed/secagg/v1/masked-with" + digest + struct.pack("<II", owner, peer)
    return hmac.digest(key, message, hashlib.sha256)[:ATTESTATION_TAG_BYTES]


def pairwise_seed(shared_secret: bytes, *, digest: bytes, a: int, b: int) -> bytes:
    """The 256-bit PRG seed of the pairwise mask between sites a and b (symmetric in a, b)."""
    low, high = (a, b) if a < b else (b, a)
    info = b"securefed/secagg/v1/pairwise-mask" + struct.pack("<II", low, high)
    return hkdf_sha256(shared_secret, salt=digest, info=info)


def share_encryption_key(shared_secret: bytes, *, digest: bytes, a: int, b: int) -> bytes:
    low, high = (a, b) if a < b else (b, a)
    info = b"securefed/secagg/v1/share-encryption" + struct.pack("<II", low, high)
    return hkdf_sha256(shared_secret, salt=digest, info=info)


def share_associated_data(*, digest: bytes, round_id: int, sender: int, recipient: int) -> bytes:
    """Binds a share ciphertext to its round and direction, so it cannot be replayed or redirected."""
    return b"securefed/secagg/v1/share" + digest + struct.pack("<QII", round_id, sender, recipient)


def encode_share_plaintext(sender: int, recipient: int, key_share: bytes, mask_share: bytes) -> bytes:
    return struct.pack("<II", sender, recipient) + key_share + mask_share


def decode_share_plaintext(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    if len(plaintext) != 8 + 2 * SHARE_BYTES:
        raise DecryptionError(f"share plaintext has {len(plaintext)} bytes, expected {8 + 2 * SHARE_BYTES}")
    sender, recipient = struct.unpack("<II", plaintext[:8])
    return sender, recipient, plaintext[8 : 8 + SHARE_BYTES], plaintext[8 + SHARE_BYTES :]
