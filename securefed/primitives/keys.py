"""Keys and identities: one import point for site identities, the roster and X25519.

The classes live in small modules of their own (:mod:`.identity`, :mod:`.roster`,
:mod:`.agreement`); this module gathers them under the name the rest of securefed uses.
"""

from __future__ import annotations

from securefed.primitives.agreement import AGREEMENT_KEY_SIZE, AgreementKeyPair, agree
from securefed.primitives.identity import (
    KEY_SIZE,
    MAX_NAME_LENGTH,
    SIGNATURE_SIZE,
    PublicIdentity,
    SiteIdentity,
)
from securefed.primitives.roster import Roster

__all__ = [
    "AGREEMENT_KEY_SIZE",
    "KEY_SIZE",
    "MAX_NAME_LENGTH",
    "SIGNATURE_SIZE",
    "AgreementKeyPair",
    "PublicIdentity",
    "Roster",
    "SiteIdentity",
    "agree",
]
