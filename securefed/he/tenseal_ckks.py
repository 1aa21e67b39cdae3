"""The TenSEAL adapter: CKKS contexts and packed vectors as bytes in, bytes out.

Everything that crosses between parties is bytes: a serialized context (the secret one for the
sites, the public one, without the secret key, for the coordinator) and serialized ciphertexts.
A vector is clipped to ``[-clip, clip]``, scaled by its weight and packed ``slots`` values per
ciphertext; the coordinator adds ciphertexts position by position.

The sites encrypt with the secret key through SEAL itself (``tenseal.sealapi``): a symmetric
ciphertext's second polynomial is uniformly random, so SEAL sends the seed it was drawn from
instead of the polynomial, which halves an upload. A summed ciphertext is a full one. Bytes from
elsewhere are parsed defensively: SEAL checks that they are a ciphertext of this context, and the
codec then checks what SEAL accepts but a sum cannot use (a third polynomial, another level, any
scale but the agreed one, which would silently rescale the whole sum). Anything wrong becomes
:class:`MalformedMessageError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from securefed.errors import ConfigError, DecryptionError, MalformedMessageError
from securefed.he.config import HEConfig
from securefed.he.tenseal_scratch import SealScratch

__all__ = ["new_context", "CKKSCodec"]

_SEAL_OVERHEAD = 1024  # bytes of SEAL header and ciphertext metadata, generously


def new_context(config: HEConfig) -> tuple[bytes, bytes]:
    """A fresh CKKS key: (the secret context for the sites, the public context for the coordinator).

    Symmetric encryption (the sites hold the secret key) is faster than public-key encryption and
    its ciphertexts travel seeded; no relinearisation or Galois keys are made, since aggregation
    only adds.
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


def _parameter_problems(seal_context: sa.SEALContext, config: HEConfig) -> list[str]:
    parms = seal_context.key_context_data().parms()
    primes = tuple(m.bit_count() for m in parms.coeff_modulus())
    problems = []
    if parms.scheme().name != "CKKS":  # TenSEAL and sealapi bind SEAL's scheme enum as two types
        problems.append(f"the context's scheme is {parms.scheme().name}, not CKKS")
    if parms.poly_modulus_degree() != config.poly_modulus_degree:
        problems.append(f"the context's ring degree is {parms.poly_modulus_degree()}, the HE config's "
                        f"poly_modulus_degree is {config.poly_modulus_degree}")
    if primes != config.coeff_mod_bit_sizes:
        problems.append(f"the context's primes have {list(primes)} bits, the HE config's coeff_mod_bit_sizes "
                        f"are {list(config.coeff_mod_bit_sizes)}")
    return problems


class CKKSCodec:
    """Encrypts, adds and decrypts packed vectors under one context (given as bytes).

    SEAL reads and writes ciphertexts only through files, so a codec keeps one private scratch
    file (:class:`~securefed.he.tenseal_scratch.SealScratch`); :meth:`close` (or leaving a
    ``with`` block, or collection) removes it, and a later call makes it again.
    """

    def __init__(self, config: HEConfig, context: bytes) -> None:
        self.config = config
        try:
            self._context = ts.context_from(bytes(context))
            self._seal_context = self._context.seal_context().data
            problems = _parameter_problems(self._seal_context, config)
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises many types on bad input
            raise MalformedMessageError(f"not a CKKS context TenSEAL can load ({type(exc).__name__})") from None
        if problems:
            raise MalformedMessageError("the CKKS context does not match the HE config: " + "; ".join(problems)
                                        + "; use the context made for this config")
        self._context.global_scale = config.scale
        self._data_level = self._seal_context.first_parms_id()
        data_primes = self._seal_context.first_context_data().parms().coeff_modulus()
        self._max_ciphertext_bytes = 2 * 8 * config.poly_modulus_degree * len(data_primes)
        self._max_ciphertext_bytes += self._max_ciphertext_bytes // 64 + _SEAL_OVERHEAD  # compression's worst case
        self._encoder = sa.CKKSEncoder(self._seal_context)
        self._evaluator = sa.Evaluator(self._seal_context)
        self._scratch = SealScratch()
        if self.holds_secret_key:
            secret_key = self._context.secret_key().data
            self._encryptor = sa.Encryptor(self._seal_context, secret_key)
            self._decryptor = sa.Decryptor(self._seal_context, secret_key)

    @property
    def holds_secret_key(self) -> bool:
        return bool(self._context.is_private())

    def encrypt(self, values: np.ndarray, *, weight: float = 1.0, append_weight: bool = False) -> list[bytes]:
        """Clip ``values`` to [-clip, clip], multiply by ``weight`` and encrypt them packed, seeded;
        with ``append_weight`` the weight itself rides in one more slot (weighted averages).

        Cheap on large float32 vectors: numpy clips and weighs the whole vector at once, and
        Python touches one ``slots``-long chunk at a time.
        """
        if not self.holds_secret_key:
            raise ConfigError("this context has no secret key: only the sites encrypt (symmetric CKKS)")
        source = np.asarray(values)
        if source.dtype not in (np.float32, np.float64):
            source = np.asarray(source, dtype=np.float64)
        source = source.reshape(-1)
        if not np.isfinite(source).all():
            raise ConfigError("the vector holds NaN or infinite values; clean it before encrypting")
        if not 0.0 <= weight <= self.config.max_weight:
            raise ConfigError(f"weight {weight!r} is outside [0, max_weight={self.config.max_weight:g}]")
        flat = np.empty(source.size + int(append_weight), dtype=np.float64)
        np.clip(source, -self.config.clip, self.config.clip, out=flat[:source.size])
        if weight != 1.0:
            flat[:source.size] *= weight
        if append_weight:
            flat[-1] = weight
        return self._encrypt_packed(flat)

    def encrypt_exact(self, values: np.ndarray) -> list[bytes]:
        """Encrypt ``values`` packed as they are (no clipping or weighting): for callers that lay
        out their own slots, each value within ``max(clip, max_weight)`` so the sum's bound holds."""
        if not self.holds_secret_key:
            raise ConfigError("this context has no secret key: only the sites encrypt (symmetric CKKS)")
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        bound = max(self.config.clip, self.config.max_weight)
        if not np.isfinite(flat).all() or (flat.size and np.abs(flat).max() > bound):
            raise ConfigError(f"the values must be finite and within [-{bound:g}, {bound:g}] (clip and max_weight "
                              "of the HE config)")
        return self._encrypt_packed(flat)

    def _encrypt_packed(self, flat: np.ndarray) -> list[bytes]:
        slots, scale, plaintext = self.config.slots, self.config.scale, sa.Plaintext()
        ciphertexts = []
        for start in range(0, max(flat.size, 1), slots):
            self._encoder.encode(flat[start:start + slots].tolist(), scale, plaintext)
            ciphertexts.append(self._scratch.save(self._encryptor.encrypt_symmetric(plaintext)))
        return ciphertexts

    def load(self, ciphertext: bytes) -> sa.Ciphertext:
        """Parse one ciphertext for this context; MalformedMessageError if it is not one a sum can use."""
        loaded = sa.Ciphertext()
        data = bytes(ciphertext)
        try:
            self._scratch.load(loaded, self._seal_context, data, max_bytes=self._max_ciphertext_bytes,
                               what="ciphertext")
        except MalformedMessageError:
            raise
        except Exception as exc:  # noqa: BLE001 - SEAL raises several types on bad input
            raise MalformedMessageError(f"not a ciphertext of this CKKS context ({type(exc).__name__}); the sender "
                                        "used another key or parameters, or the bytes were altered") from None
        problems = []
        if loaded.size() != 2:
            problems.append(f"it has {loaded.size()} polynomials, a fresh or summed one has 2")
        if not loaded.is_ntt_form():
            problems.append("it is not in NTT form, as CKKS ciphertexts are")
        if loaded.parms_id() != self._data_level:
            problems.append("it is at another modulus level than fresh ciphertexts of this context")
        if loaded.scale != self.config.scale:
            problems.append(f"its scale is {loaded.scale!r}, the agreed scale is exactly 2^{self.config.scale_bits}")
        if problems:
            raise MalformedMessageError("a ciphertext a sum cannot use: " + "; ".join(problems))
        return loaded

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
                term = self.load(upload[i])
                try:
                    self._evaluator.add_inplace(acc, term)
                except Exception as exc:  # noqa: BLE001 - load checked everything add needs; defensive
                    raise MalformedMessageError(f"ciphertexts that cannot be added ({type(exc).__name__})") from None
            total.append(self._scratch.save(acc))
        return total

    def decrypt(self, ciphertexts: Sequence[bytes], *, length: int) -> np.ndarray:
        """Decrypt packed ciphertexts back into ``length`` float64 values."""
        if not self.holds_secret_key:
            raise DecryptionError("this context has no secret key and cannot decrypt")
        slots = self.config.slots
        if len(ciphertexts) * slots < length:
            raise MalformedMessageError(f"{len(ciphertexts)} ciphertexts hold {len(ciphertexts) * slots} values, "
                                        f"fewer than {length}")
        values = np.empty(len(ciphertexts) * slots, dtype=np.float64)
        plaintext = sa.Plaintext()
        for k, ciphertext in enumerate(ciphertexts):
            self._decryptor.decrypt(self.load(ciphertext), plaintext)
            values[k * slots:(k + 1) * slots] = self._encoder.decode_double(plaintext)
        return values[:length]

    def close(self) -> None:
        """Remove the scratch folder now; the codec stays usable and makes it again when needed."""
        self._scratch.close()

    def __enter__(self) -> CKKSCodec:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        key = "secret key held" if self.holds_secret_key else "public context only"
        return (f"CKKSCodec(poly_modulus_degree={self.config.poly_modulus_degree}, "
                f"coeff_mod_bit_sizes={list(self.config.coeff_mod_bit_sizes)}, scale=2^{self.config.scale_bits}, "
                f"{key})")
