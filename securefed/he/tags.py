"""Authentication tags inside encrypted uploads, so sites can check a sum before they use it.

With the public context anyone can add ciphertexts, reorder them, add one to itself or add a
plaintext; the coordinator could thus hand sites a sum that is not the one it claims (an old
round's, one site's update counted three times, or the honest sum plus an offset of its choice).
Each site therefore fills the last ``TAG_SLOTS`` slots of every ciphertext it uploads with a
linear MAC of that ciphertext's data slots, under a key only the sites have (derived from the
secret context)::

    tag[j, a] = t[site, j, a] + <k[j, a], data[j]>

where the pads ``t`` are drawn for this round, model round, site, ciphertext ``j`` and slot
``a``, and the vectors ``k`` for this round, model round, ``j`` and ``a``. Both are linear, so an
honest sum over survivors S carries ``sum of t[s] + <k, data sum>`` in every tag slot; a site
recomputes that and refuses anything else. An altered sum passes only if the coordinator, who
knows neither pads nor ``k``, lands within ``tolerance`` of unknown targets in every tag slot
at once: per attempt about ``(tolerance / bound) ** TAG_SLOTS``, and offsets smaller than about
``slots * tolerance`` per value go unseen, both far below what training can notice with the
parameters :func:`tag_problems` accepts.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np

from securefed.primitives.randomness import SeededRandom

__all__ = ["TagKey", "TAG_SLOTS", "tagged_layout", "as_chunks", "attach_tags", "detach_tags", "tag_tolerance",
           "tag_problems"]

_DOMAIN = b"securefed/he/upload-tags/v2"
TAG_SLOTS = 2
MAX_FORGERY_BITS = -20  # log2 of the largest per-slot chance of guessing a tag that a config may allow


def _uniform(rng: SeededRandom, count: int) -> np.ndarray:
    words = np.frombuffer(rng.random_bytes(8 * count), dtype="<u8")
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53 * 2.0 - 1.0  # [-1, 1)


class TagKey:
    """The sites' tag key, derived from the secret context (never from anything public).

    ``bound`` is the largest magnitude of a data slot (the clip, or the weight); pads lie in
    ``[-bound/2, bound/2)`` and ``|<k, data>| <= bound/2``, so a tag slot stays within ``bound``.
    """

    def __init__(self, secret_context: bytes, *, slots: int, bound: float) -> None:
        self._key = hashlib.sha256(_DOMAIN + bytes(secret_context)).digest()
        self.slots, self.bound = slots, bound
        self.data_slots = slots - TAG_SLOTS

    def _rng(self, kind: bytes, *numbers: int) -> SeededRandom:
        return SeededRandom(self._key + kind + struct.pack(f"<{len(numbers)}I", *numbers))

    def pads(self, *, round_: int, model_round: int, sender: int, chunks: int) -> np.ndarray:
        """A site's pads, shape (chunks, TAG_SLOTS)."""
        rng = self._rng(b"pad", round_, model_round, sender)
        return _uniform(rng, chunks * TAG_SLOTS).reshape(chunks, TAG_SLOTS) * (self.bound / 2)

    def macs(self, data: np.ndarray, *, round_: int, model_round: int) -> np.ndarray:
        """``<k[j, a], data[j]>`` for data of shape (chunks, data_slots): shape (chunks, TAG_SLOTS)."""
        chunks = data.shape[0]
        rng = self._rng(b"mac", round_, model_round)
        scale = 1.0 / (2 * self.data_slots)
        out = np.empty((chunks, TAG_SLOTS))
        block = 64  # chunks per draw: a few MB of key vectors at a time
        for start in range(0, chunks, block):
            part = data[start:start + block]
            k = _uniform(rng, part.shape[0] * TAG_SLOTS * self.data_slots).reshape(part.shape[0], TAG_SLOTS, -1)
            out[start:start + block] = np.einsum("cad,cd->ca", k, part) * scale
        return out

    def tag(self, data: np.ndarray, *, round_: int, model_round: int, sender: int) -> np.ndarray:
        """The tag slots of one site's upload (data of shape (chunks, data_slots))."""
        pads = self.pads(round_=round_, model_round=model_round, sender=sender, chunks=data.shape[0])
        return pads + self.macs(data, round_=round_, model_round=model_round)

    def residual(self, data: np.ndarray, tags: np.ndarray, *, round_: int, model_round: int,
                 senders: list[int] | tuple[int, ...]) -> float:
        """How far a decrypted sum's tag slots are from an honest sum's over ``senders``."""
        expected = self.macs(data, round_=round_, model_round=model_round)
        for sender in senders:
            expected += self.pads(round_=round_, model_round=model_round, sender=sender, chunks=data.shape[0])
        return float(np.abs(tags - expected).max())

    def __repr__(self) -> str:
        return "TagKey(<secret>)"


def tagged_layout(length: int, slots: int) -> tuple[int, int]:
    """(ciphertexts, values on the wire) for ``length`` values plus the tag slots of each."""
    chunks = max(1, -(-length // (slots - TAG_SLOTS)))
    return chunks, chunks * slots


def attach_tags(data: np.ndarray, tags: np.ndarray) -> np.ndarray:
    """Data of shape (chunks, data_slots) and tags (chunks, TAG_SLOTS) as the flat wire layout."""
    return np.concatenate([data, tags], axis=1).reshape(-1)


def detach_tags(flat: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`attach_tags`: (data of shape (chunks, data_slots), tags)."""
    table = np.asarray(flat, dtype=np.float64).reshape(-1, slots)
    return table[:, :-TAG_SLOTS].copy(), table[:, -TAG_SLOTS:].copy()


def as_chunks(values: np.ndarray, slots: int) -> np.ndarray:
    """``values`` zero-padded into rows of ``slots - TAG_SLOTS``."""
    chunks, _ = tagged_layout(values.size, slots)
    padded = np.zeros(chunks * (slots - TAG_SLOTS))
    padded[:values.size] = values
    return padded.reshape(chunks, -1)


def tag_tolerance(*, scale_bits: int, max_sites: int) -> float:
    """How far a decrypted tag may be from the expected one: 40 times the CKKS error measured at
    ring 4096 (about 1.5 * sqrt(sites) * 2^(9 - scale_bits) for values within 1 at every scale
    from 2^30 to 2^50)."""
    return math.sqrt(max_sites) * 2.0 ** (15 - scale_bits)


def tag_problems(*, scale_bits: int, max_sites: int, bound: float) -> list[str]:
    """Why a configuration leaves the tags too easy to guess ([] if it does not)."""
    tolerance = tag_tolerance(scale_bits=scale_bits, max_sites=max_sites)
    if tolerance <= bound * 2.0**MAX_FORGERY_BITS:
        return []
    need = scale_bits + math.ceil(math.log2(tolerance / (bound * 2.0**MAX_FORGERY_BITS)))
    return [f"scale_bits = {scale_bits} is too coarse for the sites to check a sum of {max_sites} sites: the "
            f"chance that a forged sum passes must stay below 2^{MAX_FORGERY_BITS * TAG_SLOTS} per try "
            f"(2^{MAX_FORGERY_BITS} per tag slot); use scale_bits >= {need}"]
