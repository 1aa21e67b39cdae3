"""HKDF-SHA256 key derivation (RFC 5869)."""

from __future__ import annotations

import hashlib
import hmac

from securefed.errors import ConfigError

__all__ = ["HKDF_SHA256_MAX_LENGTH", "hkdf_sha256"]

# RFC 5869 caps the output at 255 blocks of the hash length.
HKDF_SHA256_MAX_LENGTH = 255 * 32


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """Derive ``length`` bytes from input keying material with HKDF-SHA256.

    ``salt`` and ``info`` are required so every call site states its domain separation
    explicitly; pass ``b""`` for an empty salt (equivalent to RFC 5869's all-zero salt).
    """
    problems = []
    for label, value in (("ikm", ikm), ("salt", salt), ("info", info)):
        if not isinstance(value, bytes | bytearray | memoryview):
            problems.append(f"{label} must be bytes, got {type(value).__name__}")
    if isinstance(length, bool) or not isinstance(length, int):
        problems.append(f"length must be an int, got {type(length).__name__}")
    elif not 1 <= length <= HKDF_SHA256_MAX_LENGTH:
        problems.append(
            f"length must be in [1, {HKDF_SHA256_MAX_LENGTH}] for HKDF-SHA256, got {length}"
        )
    if problems:
        raise ConfigError(problems)
    # RFC 5869 directly on hmac.digest: a round derives two keys per neighbour pair, and the
    # one-shot C HMAC is several times cheaper than building a KDF object per call. The tests
    # check it against the RFC vectors and against `cryptography`'s HKDF.
    prk = hmac.digest(bytes(salt) or bytes(32), bytes(ikm), hashlib.sha256)
    info = bytes(info)
    output, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes([counter]), hashlib.sha256)
        output += block
    return output[:length]
