"""Authentication tags inside encrypted uploads, so sites can check a sum they decrypt.

CKKS lets whoever holds the public context add ciphertexts, reorder them, add one to itself or add
a plaintext constant; the coordinator could thus hand sites a sum that is not the one it claims
(an old round's, one site's update counted three times, or a data value moved into the weight
slot). Each site therefore puts one tag in the last slot of every ciphertext it uploads: a
pseudorandom value drawn from a key only the sites have (derived from the secret context), the
round, the model round, the sender and the ciphertext's position. Sums add tags like everything
else, so the tag slots of an honest sum over survivors S equal the sum of their tags; a site
recomputes that and refuses anything else. The coordinator, without the key, can hit the right
values only by chance (about ``tolerance / clip`` per ciphertext).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from securefed.primitives.randomness import SeededRandom

__all__ = ["TagKey", "tagged_layout", "attach_tags", "detach_tags", "tag_tolerance"]

_DOMAIN = b"securefed/he/upload-tags/v1"


class TagKey:
    """The sites' tag key, derived from the secret context (never from anything public)."""

    def __init__(self, secret_context: bytes) -> None:
        self._key = hashlib.sha256(_DOMAIN + bytes(secret_context)).digest()

    def tags(self, *, round_: int, model_round: int, sender: int, chunks: int, clip: float) -> np.ndarray:
        """One tag in ``[-clip, clip)`` for each of a site's ``chunks`` ciphertexts."""
        label = struct.pack("<III", round_, model_round, sender)
        words = np.frombuffer(SeededRandom(self._key + label).random_bytes(8 * chunks), dtype="<u8")
        uniform = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return (2.0 * uniform - 1.0) * clip

    def expected(self, *, round_: int, model_round: int, senders: list[int] | tuple[int, ...], chunks: int,
                 clip: float) -> np.ndarray:
        """The tag slots of an honest sum over ``senders``."""
        total = np.zeros(chunks)
        for sender in senders:
            total += self.tags(round_=round_, model_round=model_round, sender=sender, chunks=chunks, clip=clip)
        return total

    def __repr__(self) -> str:
        return "TagKey(<secret>)"


def tagged_layout(length: int, slots: int) -> tuple[int, int]:
    """(ciphertexts, values on the wire) for ``length`` values with one tag per ciphertext."""
    chunks = max(1, -(-length // (slots - 1)))
    return chunks, chunks * slots


def attach_tags(values: np.ndarray, tags: np.ndarray, slots: int) -> np.ndarray:
    """``values`` cut into pieces of ``slots - 1`` (zero-padded), each followed by its tag."""
    chunks = tags.size
    padded = np.zeros(chunks * (slots - 1))
    padded[:values.size] = values
    return np.concatenate([padded.reshape(chunks, slots - 1), tags.reshape(chunks, 1)], axis=1).reshape(-1)


def detach_tags(flat: np.ndarray, length: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`attach_tags`: (the first ``length`` values, the tags)."""
    table = np.asarray(flat, dtype=np.float64).reshape(-1, slots)
    return table[:, :-1].reshape(-1)[:length], table[:, -1].copy()


def tag_tolerance(*, scale_bits: int, max_sites: int) -> float:
    """How far a decrypted tag sum may be from the expected one: well above CKKS error (measured
    at most about sqrt(sites) * 2^(12 - scale_bits)), well below any value a guess could hit."""
    return max_sites * 2.0 ** (16 - scale_bits)
