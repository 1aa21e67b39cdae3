"""The TenSEAL adapter: CKKS contexts and packed vectors as bytes in, bytes out.

Everything that crosses between parties is bytes: a serialized context (the secret one for the
sites, the public one, without the secret key, for the coordinator) and serialized ciphertexts.
A vector is clipped to ``[-clip, clip]``, scaled by its weight and packed ``slots`` values per
ciphertext; the coordinator adds ciphertexts position by position. Bytes from elsewhere are
parsed defensively: anything TenSEAL cannot load or add becomes :class:`MalformedMessageError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal as ts

from securefed.errors import ConfigError, DecryptionError, MalformedMessageError
from securefed.he.config import HEConfig

__all__ = ["new_context", "CKKSCodec"]


def new_context(config: HEConfig) -> tuple[bytes, bytes]:
    """A fresh CKKS key: (the secret context for the sites, the public context for the coordinator).

    Symmetric encryption (the sites hold the secret key) is faster than public-key encryption;
    no relinearisation or Galois keys are made, since aggregation only adds.
    """
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=config.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = config.scale
    secret = context.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False,
                               save_relin_keys=False)
    public = context.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                               save_relin_keys=False)
    return secret, public


class CKKSCodec:
    """Encrypts, adds and decrypts packed vectors under one context (given as bytes)."""

    def __init__(self, config: HEConfig, context: bytes) -> None:
        try:
            self._context = ts.context_from(bytes(context))
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises many types on bad input
            raise MalformedMessageError(f"not a CKKS context TenSEAL can load ({type(exc).__name__})") from None
        self._context.global_scale = config.scale
        self.config = config

    @property
    def holds_secret_key(self) -> bool:
        return bool(self._context.is_private())

    def encrypt(self, values: np.ndarray, *, weight: float = 1.0, append_weight: bool = False) -> list[bytes]:
        """Clip ``values`` to [-clip, clip], multiply by ``weight`` and encrypt them packed; with
        ``append_weight`` the weight itself rides in one more slot (weighted averages)."""
        if not self.holds_secret_key:
            raise ConfigError("this context has no secret key: only the sites encrypt (symmetric CKKS)")
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.isfinite(flat).all():
            raise ConfigError("the vector holds NaN or infinite values; clean it before encrypting")
        if not 0.0 <= weight <= self.config.max_weight:
            raise ConfigError(f"weight {weight!r} is outside [0, max_weight={self.config.max_weight:g}]")
        flat = np.clip(flat, -self.config.clip, self.config.clip) * weight
        if append_weight:
            flat = np.append(flat, weight)
        slots = self.config.slots
        return [ts.ckks_vector(self._context, flat[i:i + slots].tolist()).serialize()
                for i in range(0, max(flat.size, 1), slots)]

    def load(self, ciphertext: bytes) -> ts.CKKSVector:
        """Parse one ciphertext for this context; MalformedMessageError if it is not one."""
        try:
            return ts.ckks_vector_from(self._context, bytes(ciphertext))
        except Exception as exc:  # noqa: BLE001
            raise MalformedMessageError(f"not a ciphertext of this CKKS context ({type(exc).__name__})") from None

    def add(self, uploads: Sequence[Sequence[bytes]]) -> list[bytes]:
        """Add the sites' uploads position by position (every upload has the same number of pieces)."""
        if not uploads:
            raise ConfigError("there is nothing to add")
        count = len(uploads[0])
        if any(len(u) != count for u in uploads):
            raise MalformedMessageError("the uploads hold different numbers of ciphertexts")
        total = []
        for i in range(count):
            acc = self.load(uploads[0][i])
            for upload in uploads[1:]:
                try:
                    acc += self.load(upload[i])
                except MalformedMessageError:
                    raise
                except Exception as exc:  # noqa: BLE001 - mismatched parameters, sizes or scales
                    raise MalformedMessageError(f"ciphertexts that cannot be added ({type(exc).__name__})") from None
            total.append(acc.serialize())
        return total

    def decrypt(self, ciphertexts: Sequence[bytes], *, length: int) -> np.ndarray:
        """Decrypt packed ciphertexts back into ``length`` float64 values."""
        if not self.holds_secret_key:
            raise DecryptionError("this context has no secret key and cannot decrypt")
        values: list[float] = []
        for ciphertext in ciphertexts:
            values.extend(self.load(ciphertext).decrypt())
        if len(values) < length:
            raise MalformedMessageError(f"the ciphertexts hold {len(values)} values, fewer than {length}")
        return np.asarray(values[:length], dtype=np.float64)
