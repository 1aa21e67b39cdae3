"""CKKS parameters for addition-only aggregation, checked for 128-bit security and for overflow.

Aggregation only adds ciphertexts (multiplicative depth 0), so the ciphertext modulus q only has
to hold the scaled sum: ``max_sites * clip * max_weight * 2**scale_bits < q / 2`` with head-room,
and the ring degree n and log2(q) must stay within the HomomorphicEncryption.org standard's
128-bit bound for ternary secrets (Albrecht et al., "Homomorphic Encryption Standard", 2018):

    n      1024  2048  4096  8192  16384  32768
    log q    27    54   109   218    438    881
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from securefed.errors import ConfigError
from securefed._values import is_int, is_real

__all__ = ["HEConfig", "MAX_LOG_Q_128", "parameter_problems"]

MAX_LOG_Q_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
_HEADROOM_BITS = 2  # beyond the sum's magnitude, so rounding noise never reaches q/2
# Integer sums must decrypt to within 0.5 of the truth: measured at ring 4096, 20 sites' sums of
# 32-bit integers err by at most 0.034 at scale 2^16 (0.14 at 2^14); the error grows as sqrt(sites).
MIN_INTEGER_SCALE_BITS = 16



def parameter_problems(*, poly_modulus_degree: object, coeff_mod_bit_sizes: object, scale_bits: object) -> list[str]:
    """What is wrong with a ring degree, modulus primes and scale, 128-bit security included."""
    problems = []
    n, bits = poly_modulus_degree, coeff_mod_bit_sizes
    if n not in MAX_LOG_Q_128:
        problems.append(f"poly_modulus_degree must be one of {sorted(MAX_LOG_Q_128)}, got {n!r}")
    if not isinstance(bits, tuple) or not bits or not all(is_int(b) and 20 <= b <= 60 for b in bits):
        problems.append(f"coeff_mod_bit_sizes must be a non-empty list of prime sizes in [20, 60] bits, got {bits!r}")
    elif n in MAX_LOG_Q_128 and sum(bits) > MAX_LOG_Q_128[n]:  # type: ignore[index]
        problems.append(f"coeff_mod_bit_sizes sum to {sum(bits)} bits, above the {MAX_LOG_Q_128[n]} bits that keep "  # type: ignore[index]
                        f"ring degree {n} at 128-bit security; use smaller primes or a larger poly_modulus_degree")
    if not is_int(scale_bits) or not 10 <= scale_bits <= 60:  # type: ignore[operator]
        problems.append(f"scale_bits must be an int in [10, 60], got {scale_bits!r}")
    return problems


@dataclass(frozen=True, kw_only=True)
class HEConfig:
    """CKKS settings of encrypted aggregation; every problem is reported at once.

    ``poly_modulus_degree`` n gives n/2 slots per ciphertext; ``coeff_mod_bit_sizes`` the primes of
    q (their sum must meet the 128-bit bound for n); ``scale_bits`` the fixed-point scale 2^s.
    Each site's values are clipped to ``[-clip, clip]`` and weighted by at most ``max_weight``;
    up to ``max_sites`` of them are summed.
    """

    # Depth 0 needs one data prime; n = 4096 with 60 + 49 = 109 bits is the largest 128-bit
    # setting at that degree, and scale 2^50 leaves room for 100 sites' sums of values up to 1
    # (measured error of a 10-site sum: about 4e-11 of the values' scale).
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 50
    clip: float = 1.0
    max_weight: float = 1.0
    max_sites: int = 100

    def __post_init__(self) -> None:
        bits = self.coeff_mod_bit_sizes
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(bits) if isinstance(bits, list | tuple) else bits)
        problems = parameter_problems(poly_modulus_degree=self.poly_modulus_degree,
                                      coeff_mod_bit_sizes=self.coeff_mod_bit_sizes, scale_bits=self.scale_bits)
        for name in ("clip", "max_weight"):
            value = getattr(self, name)
            if not is_real(value) or value <= 0:
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        if not is_int(self.max_sites) or self.max_sites < 1:
            problems.append(f"max_sites must be an int >= 1, got {self.max_sites!r}")
        if not problems:
            need, have = self.sum_bits(), self.data_modulus_bits
            if need > have:
                lowest = self.scale_bits - (need - have)
                fixes = ([f"lower scale_bits to at most {lowest}"] if lowest >= 10 else []) + [
                    "lower clip", "sum fewer sites (max_sites)"]
                problems.append(
                    f"a sum of {self.max_sites} sites' values up to "
                    f"{max(self.clip * self.max_weight, self.clip, self.max_weight):g} at scale 2^"
                    f"{self.scale_bits} needs {need} bits, but the ciphertext modulus has {have}: "
                    + ", or ".join(fixes))
        if problems:
            raise ConfigError(problems)

    @property
    def slots(self) -> int:
        """Values packed into one ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus ciphertexts live in: every prime but the last, which SEAL keeps
        for key switching (a single prime is both)."""
        bits = self.coeff_mod_bit_sizes
        return sum(bits[:-1]) if len(bits) > 1 else bits[0]

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def sum_bits(self) -> int:
        """Bits the largest possible sum occupies at this scale, head-room and sign included. One
        slot holds at most a weighted value, a weight or a tag (:mod:`securefed.he.tags`)."""
        largest = max(self.clip * self.max_weight, self.clip, self.max_weight)
        magnitude = self.max_sites * largest * self.scale
        return math.ceil(math.log2(magnitude)) + 1 + _HEADROOM_BITS

    def for_integers(self, bit_width: int) -> HEConfig:
        """These parameters, set to sum ``bit_width``-bit ring elements exactly (centred, so each
        is at most 2^(bit_width-1) in size): the decrypted sum, rounded and reduced modulo
        2^bit_width, is the modular sum secure aggregation would give (site-level DP's noised
        encodings). The scale drops to what the modulus leaves; ConfigError if that is too little."""
        clip = float(2 ** (bit_width - 1))
        magnitude_bits = math.ceil(math.log2(self.max_sites * clip)) + 1 + _HEADROOM_BITS
        scale_bits = min(self.scale_bits, self.data_modulus_bits - magnitude_bits)
        if scale_bits < MIN_INTEGER_SCALE_BITS:
            raise ConfigError(f"summing {self.max_sites} sites' {bit_width}-bit integers leaves a scale of 2^{scale_bits}, "
                              f"below the 2^{MIN_INTEGER_SCALE_BITS} that keeps the sum exact; use bit_width = 32, fewer "
                              "sites per round, or larger coeff_mod_bit_sizes")
        return HEConfig(poly_modulus_degree=self.poly_modulus_degree, coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
                        scale_bits=scale_bits, clip=clip, max_weight=1.0, max_sites=self.max_sites)

    def ciphertexts_for(self, length: int) -> int:
        """How many ciphertexts a vector of ``length`` values packs into."""
        return max(1, -(-length // self.slots))
