"""A site's encrypted upload: ciphertexts under the federation's CKKS key, signed by the site.

The signature (the site's Ed25519 roster key) covers the round, the sender, the id of the key
the ciphertexts are under, the vector length, a tag of the model the update started from (keyed
by the sites, so it shows only whether two sites started from the same model) and the SHA-256 of
every ciphertext,
so the coordinator can refuse uploads that are unsigned, forged, altered, from another round or
for another key before it adds anything. (CKKS itself cannot tell a ciphertext under a foreign
key from a genuine one: adding it would silently corrupt the sum.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from securefed.serialization import Reader, Writer

__all__ = ["EncryptedUpload", "HERoundSetup", "MAX_CIPHERTEXTS", "MAX_CIPHERTEXT_BYTES"]

_MAGIC = b"SFHE"
_SETUP_MAGIC = b"SFHR"
_VERSION = 2
_DOMAIN = b"securefed/he/upload/v2"
MAX_CIPHERTEXTS = 1 << 16
MAX_CIPHERTEXT_BYTES = 1 << 24


@dataclass(frozen=True, eq=False)
class EncryptedUpload:
    round_id: int
    sender: int  # the site's index in the roster
    context_digest: bytes  # the key's id (securefed.he.keys.key_id)
    length: int  # values packed into the ciphertexts
    ciphertexts: tuple[bytes, ...]
    signature: bytes = b""
    model_tag: bytes = bytes(32)  # keyed digest of the model the update started from (zeros: none)

    def _fields(self, w: Writer) -> Writer:
        w.u64(self.round_id).u32(self.sender).fixed(self.context_digest, 32).fixed(self.model_tag, 32)
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
        model_tag, length = r.fixed(32, "model tag"), r.u64("length")
        count = r.count("ciphertexts", item_size=4, max_count=MAX_CIPHERTEXTS)
        ciphertexts = tuple(r.blob("ciphertext", max_size=MAX_CIPHERTEXT_BYTES) for _ in range(count))
        signature = r.fixed(64, "signature")
        r.finish()
        return cls(round_id, sender, digest, length, ciphertexts, signature, model_tag)


@dataclass(frozen=True, eq=False)
class HERoundSetup:
    """Coordinator -> sites: what one encrypted round sums, so each site can check it before it
    trains. Every participant gets the same bytes; a site refuses a round whose context digest is
    not the one it holds (so all summed uploads are under one key), that it is not part of, that
    sums fewer than ``min_sites`` sites, or that does not start from the model it holds."""

    round_id: int  # the protocol round (replays are refused by id)
    model_round: int  # the training round whose global model this round starts from (0: initial)
    participants: tuple[int, ...]  # roster indices
    context_digest: bytes
    length: int  # values per upload, the weight slot included
    ciphertexts: int
    min_sites: int

    def encode(self) -> bytes:
        w = Writer().fixed(_SETUP_MAGIC, 4).u8(_VERSION).u64(self.round_id).u32(self.model_round)
        w.u32_list(list(self.participants)).fixed(self.context_digest, 32)
        return w.u64(self.length).u32(self.ciphertexts).u32(self.min_sites).getvalue()

    @classmethod
    def decode(cls, data: bytes) -> HERoundSetup:
        r = Reader(data, what="HE round setup")
        r.header(_SETUP_MAGIC, _VERSION, kind="HE round setup")
        round_id, model_round = r.u64("round id"), r.u32("model round")
        participants = r.u32_list("participants", max_count=MAX_CIPHERTEXTS)
        digest = r.fixed(32, "context digest")
        setup = cls(round_id, model_round, participants, digest, r.u64("length"), r.u32("ciphertexts"),
                    r.u32("minimum sites"))
        r.finish()
        return setup
