"""Low-level cryptographic building blocks of securefed.

Like the ``hazmat`` layer of pyca/cryptography, these are sharp tools: each is correct on its
own but easy to combine insecurely (reusing a mask seed, skipping HKDF on a raw X25519
secret, choosing a quantisation scale that overflows). Most users want
:mod:`securefed.secagg`, which assembles them into a protocol.

Contents: randomness sources and samplers, HKDF-SHA256, XChaCha20-Poly1305 AEAD, site
identities and the roster (Ed25519/X25519), the AES-256-CTR mask PRG, Shamir secret sharing
over GF(2**31 - 1), and fixed-point quantisation into Z_(2**b).
"""

from __future__ import annotations

from securefed.primitives.aead import KEY_SIZE as AEAD_KEY_SIZE
from securefed.primitives.aead import NONCE_SIZE as AEAD_NONCE_SIZE
from securefed.primitives.aead import open_sealed, seal
from securefed.primitives.kdf import hkdf_sha256
from securefed.primitives.keys import (
    AgreementKeyPair,
    PublicIdentity,
    Roster,
    SiteIdentity,
    agree,
)
from securefed.primitives.prg import SEED_SIZE, MaskAccumulator, expand, expand_into
from securefed.primitives.quantize import FixedPointCodec
from securefed.primitives.randomness import (
    RandomSource,
    SeededRandom,
    SystemRandom,
    default_random,
    uniform_below,
    uniform_floats,
)
from securefed.primitives.shamir import (
    PRIME,
    reconstruct_secret,
    reconstruct_secrets,
    share_secrets,
    share_size,
)

__all__ = [
    "AEAD_KEY_SIZE",
    "AEAD_NONCE_SIZE",
    "PRIME",
    "SEED_SIZE",
    "AgreementKeyPair",
    "FixedPointCodec",
    "MaskAccumulator",
    "PublicIdentity",
    "RandomSource",
    "Roster",
    "SeededRandom",
    "SiteIdentity",
    "SystemRandom",
    "agree",
    "default_random",
    "expand",
    "expand_into",
    "hkdf_sha256",
    "open_sealed",
    "reconstruct_secret",
    "reconstruct_secrets",
    "seal",
    "share_secrets",
    "share_size",
    "uniform_below",
    "uniform_floats",
]
