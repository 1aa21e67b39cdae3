"""Long-term site identities: an Ed25519 signing key and an X25519 encryption key.

:class:`SiteIdentity` holds the secrets and lives in a 0600 file at its site;
:class:`PublicIdentity` is what every other party knows about it (via the roster).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.signing

from securefed.errors import ConfigError, InvalidSignatureError
from securefed.primitives._files import read_private, write_atomic
from securefed.primitives.agreement import agree
from securefed.primitives.randomness import RandomSource

__all__ = [
    "KEY_SIZE",
    "SIGNATURE_SIZE",
    "MAX_NAME_LENGTH",
    "PublicIdentity",
    "SiteIdentity",
    "validate_name",
    "decode_key",
]

KEY_SIZE = 32
SIGNATURE_SIZE = 64
MAX_NAME_LENGTH = 128

_IDENTITY_FORMAT = "securefed-site-identity"
_IDENTITY_VERSION = 1


def validate_name(name: object, problems: list[str]) -> None:
    """Append a problem to ``problems`` unless ``name`` is a valid site name."""
    if not isinstance(name, str):
        problems.append(f"site name must be a str, got {type(name).__name__}")
    elif not name:
        problems.append("site name must not be empty")
    elif len(name) > MAX_NAME_LENGTH:
        problems.append(
            f"site name {name[:20]!r}... is {len(name)} characters; the limit is {MAX_NAME_LENGTH}"
        )
    elif not name.isprintable() or name != name.strip():
        problems.append(
            f"site name {name!r} must be printable with no leading or trailing whitespace"
        )


def decode_key(value: object, field_name: str, problems: list[str]) -> bytes:
    """Decode a 32-byte public key written as hex or base64; record a problem on failure."""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            if len(value) == 2 * KEY_SIZE and all(c in "0123456789abcdefABCDEF" for c in value):
                raw = bytes.fromhex(value)
            else:
                raw = base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            problems.append(f"{field_name} is neither hex nor base64")
            return b""
    else:
        problems.append(f"{field_name} must be a hex or base64 string, got {type(value).__name__}")
        return b""
    if len(raw) != KEY_SIZE:
        problems.append(f"{field_name} must decode to {KEY_SIZE} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class PublicIdentity:
    """What the federation knows about a site: its name and long-term public keys."""

    name: str
    verify_key: bytes
    encryption_key: bytes

    def __post_init__(self) -> None:
        problems: list[str] = []
        validate_name(self.name, problems)
        for field_name in ("verify_key", "encryption_key"):
            value = getattr(self, field_name)
            if not isinstance(value, bytes | bytearray):
                problems.append(f"{field_name} must be bytes, got {type(value).__name__}")
            elif len(value) != KEY_SIZE:
                problems.append(f"{field_name} must be {KEY_SIZE} bytes, got {len(value)}")
            else:
                object.__setattr__(self, field_name, bytes(value))
        if problems:
            raise ConfigError(problems)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Check an Ed25519 signature by this site; raise :class:`InvalidSignatureError` if bad."""
        try:
            nacl.signing.VerifyKey(self.verify_key).verify(bytes(message), bytes(signature))
        except (nacl.exceptions.CryptoError, TypeError, ValueError):
            raise InvalidSignatureError(
                f"signature does not verify under the key of site {self.name!r}"
            ) from None

    def to_dict(self) -> dict[str, str]:
        """Return a JSON-ready dict with the keys as lowercase hex."""
        return {
            "name": self.name,
            "verify_key": self.verify_key.hex(),
            "encryption_key": self.encryption_key.hex(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> PublicIdentity:
        """Build from :meth:`to_dict` output; keys may be hex or base64 strings."""
        if not isinstance(data, dict):
            raise ConfigError(f"a public identity must be a JSON object, got {type(data).__name__}")
        problems: list[str] = []
        missing = [k for k in ("name", "verify_key", "encryption_key") if k not in data]
        if missing:
            raise ConfigError(f"public identity lacks the fields {missing}")
        unknown = sorted(set(data) - {"name", "verify_key", "encryption_key"})
        if unknown:
            problems.append(f"public identity has unknown fields {unknown}")
        validate_name(data["name"], problems)
        verify_key = decode_key(data["verify_key"], "verify_key", problems)
        encryption_key = decode_key(data["encryption_key"], "encryption_key", problems)
        if problems:
            raise ConfigError(problems)
        return cls(name=data["name"], verify_key=verify_key, encryption_key=encryption_key)


class SiteIdentity:
    """A site's long-term secrets: Ed25519 signing key and X25519 encryption key."""

    __slots__ = ("_name", "_signing_key", "_encryption_key")

    def __init__(self, name: str, signing_seed: bytes, encryption_secret: bytes) -> None:
        problems: list[str] = []
        validate_name(name, problems)
        labelled = (("signing seed", signing_seed), ("encryption secret", encryption_secret))
        for label, value in labelled:
            if not isinstance(value, bytes | bytearray) or len(value) != KEY_SIZE:
                problems.append(f"{label} must be {KEY_SIZE} bytes")
        if problems:
            raise ConfigError(problems)
        self._name = name
        self._signing_key = nacl.signing.SigningKey(bytes(signing_seed))
        self._encryption_key = nacl.public.PrivateKey(bytes(encryption_secret))

    @classmethod
    def generate(cls, name: str, rng: RandomSource | None = None) -> SiteIdentity:
        """Create a fresh identity, from ``rng`` if given (reproducible), else from the OS."""
        if rng is None:
            return cls(name, os.urandom(KEY_SIZE), os.urandom(KEY_SIZE))
        return cls(name, rng.random_bytes(KEY_SIZE), rng.random_bytes(KEY_SIZE))

    @property
    def name(self) -> str:
        """The site's name, as listed in the roster."""
        return self._name

    @property
    def encryption_secret(self) -> bytes:
        """The long-term X25519 secret key. Handle with care: never log or send it."""
        return bytes(self._encryption_key)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte detached Ed25519 signature of ``message``."""
        return self._signing_key.sign(bytes(message)).signature

    def agree(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared secret between the long-term key and ``peer_public``.

        Feed it through :func:`hkdf_sha256` before use; it is not uniformly random.
        """
        return agree(self.encryption_secret, peer_public)

    def public(self) -> PublicIdentity:
        """Return the public half: name, verify key and encryption key."""
        return PublicIdentity(
            name=self._name,
            verify_key=bytes(self._signing_key.verify_key),
            encryption_key=bytes(self._encryption_key.public_key),
        )

    def _to_json(self) -> str:
        document = {
            "format": _IDENTITY_FORMAT,
            "version": _IDENTITY_VERSION,
            "name": self._name,
            "signing_seed": bytes(self._signing_key).hex(),
            "encryption_secret": bytes(self._encryption_key).hex(),
        }
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the identity to ``path`` with mode 0600, atomically.

        Refuses to replace an existing file unless ``overwrite=True``.
        """
        return write_atomic(path, self._to_json().encode("utf-8"), mode=0o600, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SiteIdentity:
        """Read an identity written by :meth:`save`.

        Raises :class:`ConfigError` if the file is missing, readable by group or others,
        not a securefed identity file, of an unknown version, or corrupt.
        """
        text = read_private(path, "identity file")
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"identity file {path} is not valid JSON") from None
        if not isinstance(document, dict) or document.get("format") != _IDENTITY_FORMAT:
            raise ConfigError(f"{path} is not a securefed site identity file")
        if document.get("version") != _IDENTITY_VERSION:
            raise ConfigError(
                f"identity file {path} has version {document.get('version')!r}; this "
                f"securefed reads version {_IDENTITY_VERSION}"
            )
        problems: list[str] = []
        secrets_: dict[str, bytes] = {}
        for field_name in ("signing_seed", "encryption_secret"):
            value = document.get(field_name)
            try:
                raw = bytes.fromhex(value) if isinstance(value, str) else b""
            except ValueError:
                raw = b""
            if len(raw) != KEY_SIZE:
                # Say which field is damaged, never what it contains.
                problems.append(f"{field_name} is missing or not {KEY_SIZE} bytes of hex")
            secrets_[field_name] = raw
        validate_name(document.get("name"), problems)
        if problems:
            raise ConfigError([f"identity file {path} is corrupt: {p}" for p in problems])
        return cls(document["name"], secrets_["signing_seed"], secrets_["encryption_secret"])

    def __repr__(self) -> str:
        verify_key = bytes(self._signing_key.verify_key).hex()
        return (
            f"SiteIdentity(name={self._name!r}, verify_key={verify_key[:16]}..., "
            "<secrets hidden>)"
        )
