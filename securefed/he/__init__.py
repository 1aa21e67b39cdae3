"""Homomorphic-encryption aggregation (CKKS): the coordinator adds ciphertexts it cannot decrypt.

- :mod:`.keys` — the dealer's CKKS secret context, sealed to each site's roster key and signed;
  the coordinator gets only the public context.
- :mod:`.config` — :class:`HEConfig`, checked for 128-bit security and for overflow of the sum.
- :mod:`.messages`, :mod:`.aggregator` — signed uploads and the coordinator's pure state
  machine, which refuses unsigned, foreign-context, wrong-size or altered uploads and goes on.
- :mod:`.tenseal_ckks` — the TenSEAL adapter (loads on first use); :func:`encrypted_sum` runs a
  whole aggregation in one process.

The federation's ``aggregation = "he"`` is built on these, one layer up.
"""

from __future__ import annotations

from securefed._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "HEConfig": "config",
    "SealedContext": "keys",
    "seal_context": "keys",
    "open_context": "keys",
    "context_digest": "keys",
    "key_id": "keys",
    "EncryptedUpload": "messages",
    "HEAggregator": "aggregator",
    "EncryptedTotal": "aggregator",
    "encrypted_sum": "recipes",
    "EncryptedSumResult": "recipes",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
