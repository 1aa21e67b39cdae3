"""Homomorphic-encryption aggregation (CKKS): the coordinator adds ciphertexts it cannot decrypt.

This release has the key delivery (:mod:`.keys`): the dealer's CKKS secret context sealed to
each site's roster key and signed, so only the sites hold the key. The aggregation itself and
``aggregation = "he"`` in the federation are on the way.
"""

from __future__ import annotations

from securefed.he.keys import RUN_ID_SIZE, SealedContext, context_digest, open_context, seal_context

__all__ = ["RUN_ID_SIZE", "SealedContext", "context_digest", "open_context", "seal_context"]
