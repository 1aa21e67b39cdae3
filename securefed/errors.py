"""The securefed error hierarchy.

Every error derives from :class:`SecurefedError` and also from the builtin it resembles, so a
caller who only knows ``except ValueError`` still catches bad configuration, and one who knows
securefed can tell a protocol abort from a decryption failure.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "SecurefedError",
    "ConfigError",
    "MissingDependencyError",
    "CryptoError",
    "DecryptionError",
    "InvalidSignatureError",
    "ReconstructionError",
    "ProtocolError",
    "MalformedMessageError",
    "UnexpectedMessageError",
    "ProtocolAbort",
    "PrivacyError",
    "PrivacyBudgetExceeded",
    "UnsupportedMechanismError",
    "LedgerIntegrityError",
]


class SecurefedError(Exception):
    """Base class of every error securefed raises on purpose."""


class ConfigError(SecurefedError, ValueError):
    """A configuration or argument is invalid.

    ``problems`` lists every problem found, not just the first, so one run shows all fixes needed.
    """

    def __init__(self, problems: str | Iterable[str]) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} configuration problems:\n{listed}"
        super().__init__(message)


class MissingDependencyError(SecurefedError, ImportError):
    """An optional heavy dependency (opacus, tenseal, monai, flwr) is not installed."""


class CryptoError(SecurefedError):
    """A cryptographic operation failed."""


class DecryptionError(CryptoError, ValueError):
    """A ciphertext did not authenticate under the expected key and associated data."""


class InvalidSignatureError(CryptoError, ValueError):
    """A signature did not verify against the expected public key."""


class ReconstructionError(CryptoError, ValueError):
    """A secret could not be reconstructed (too few or inconsistent shares)."""


class ProtocolError(SecurefedError):
    """A protocol party received something it cannot accept."""


class MalformedMessageError(ProtocolError, ValueError):
    """Message bytes could not be decoded (truncated, oversized, wrong version, corrupted)."""


class UnexpectedMessageError(ProtocolError, RuntimeError):
    """A well-formed message arrived in a stage where it is not allowed."""


class ProtocolAbort(ProtocolError, RuntimeError):
    """The round was abandoned: too few parties survived, or a party detected misbehaviour.

    The message names the stage and the reason; it never contains secret material.
    """

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        self.stage = stage
        super().__init__(f"[{stage}] {message}" if stage else message)


class PrivacyError(SecurefedError):
    """A differential-privacy operation cannot be carried out as asked."""


class PrivacyBudgetExceeded(PrivacyError, RuntimeError):
    """Running a mechanism would spend more privacy than the budget allows."""


class UnsupportedMechanismError(PrivacyError, NotImplementedError):
    """An accountant was given a mechanism it cannot account for."""


class LedgerIntegrityError(SecurefedError, ValueError):
    """A privacy ledger has been edited, truncated, reordered or is not a securefed ledger."""
