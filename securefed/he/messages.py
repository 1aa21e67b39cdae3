"""A site's encrypted upload: ciphertexts under the federation's CKKS key, signed by the site.

The signature (the site's Ed25519 roster key) covers the round, the sender, the digest of the
public context the ciphertexts are for, the vector length and the SHA-256 of every ciphertext,
so the coordinator can refuse uploads that are unsigned, forged, altered, from another round or
for another key before it adds anything. (CKKS itself cannot tell a ciphertext under a foreign
key from a genuine one: adding it would silently corrupt the sum.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from securefed.serialization import Reader, Writer

__all__ = ["EncryptedUpload", "MAX_CIPHERTEXTS", "MAX_CIPHERTEXT_BYTES"]

_MAGIC = b"SFHE"
_VERSION = 1
_DOMAIN = b"securefed/he/upload/v1"
MAX_CIPHERTEXTS = 1 << 16
MAX_CIPHERTEXT_BYTES = 1 << 24


@dataclass(frozen=True, eq=False)
class EncryptedUpload:
    round_id: int
    sender: int  # the site's index in the roster
    context_digest: bytes  # SHA-256 of the public context (see securefed.he.keys.context_digest)
    length: int  # values in the vector, the weight excluded
    ciphertexts: tuple[bytes, ...]
    signature: bytes = b""

    def _fields(self, w: Writer) -> Writer:
        w.u64(self.round_id).u32(self.sender).fixed(self.context_digest, 32)
        return w.u64(self.length).u32(len(self.ciphertexts))

    def statement(self) -> bytes:
        """What the site signs: every field but the signature, each ciphertext by its hash."""
        w = self._fields(Writer().blob(_DOMAIN))
        for ciphertext in self.ciphertexts:
            w.fixed(hashlib.sha256(ciphertext).digest(), 32)
        return w.getvalue()

    def encode(self) -> bytes:
        w = self._fields(Writer().fixed(_MAGIC, 4).u8(_VERSION))
        for ciphertext in self.ciphertexts:
            w.blob(ciphertext)
        return w.fixed(self.signature, 64).getvalue()

    @classmethod
    def decode(cls, data: bytes) -> EncryptedUpload:
        r = Reader(data, what="encrypted upload")
        r.header(_MAGIC, _VERSION, kind="encrypted upload")
        round_id, sender, digest = r.u64("round id"), r.u32("sender"), r.fixed(32, "context digest")
        length = r.u64("length")
        count = r.count("ciphertexts", item_size=4, max_count=MAX_CIPHERTEXTS)
        ciphertexts = tuple(r.blob("ciphertext", max_size=MAX_CIPHERTEXT_BYTES) for _ in range(count))
        signature = r.fixed(64, "signature")
        r.finish()
        return cls(round_id, sender, digest, length, ciphertexts, signature)
