"""How the default neighbourhood size k and threshold t are chosen.

Notation: n sites; each site's *neighbourhood* is itself plus its k graph neighbours, m = k + 1
sites, and its secrets are Shamir-shared among them with threshold t. Three requirements:

* **No split (security).** A coordinator learns a site's input only by recovering both its
  self-mask seed and its masking key. An honest holder reveals one or the other for a given
  peer, never both; corrupted holders (at most c per neighbourhood) reveal both. Recovering both
  needs (t - c) + (t - c) distinct honest holders plus the c corrupt ones, impossible when
  2t > m + c. Hence t = floor((m + c) / 2) + 1, which is also > m / 2.
* **Connectivity (security).** Masks only hide an input inside the sum of a connected group:
  every honest survivor should keep at least one honest, surviving neighbour. With dropout
  rate d and corrupt fraction g, a union bound gives n * (d + g)^k <= 2^-sigma.
* **Completion (correctness).** A neighbourhood must keep t live holders:
  n * P[Binomial(k, 1 - d) + 1 < t] <= 2^-eta.

For the sparse graph c is the (1 - 2^-sigma / n) quantile of Binomial(k, g); for the complete
graph c = ceil(g * n). Defaults: d = 0.1, g = 0 (the threat model is a malicious coordinator
with no colluding sites; raise g if sites may collude with it), sigma = 40 bits, eta = 20 bits.
They give, for example, k = 30, t = 16 at n = 100 and k = 34, t = 18 at n = 1000; with g = 0.05
the corrupt-holder bound dominates and k grows to 78 and 86. The graph is a
Harary ring over a permutation drawn from the public round seed (see ``graph.py``); the bounds
above assume that seed is not chosen by the adversary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from securefed.errors import ConfigError

__all__ = [
    "ParameterChoice",
    "choose_parameters",
    "minimum_threshold",
    "default_threshold",
    "DEFAULT_DROPOUT_RATE",
    "DEFAULT_CORRUPT_FRACTION",
    "DEFAULT_SECURITY_BITS",
    "DEFAULT_FAILURE_BITS",
]

DEFAULT_DROPOUT_RATE = 0.1
DEFAULT_CORRUPT_FRACTION = 0.0
DEFAULT_SECURITY_BITS = 40
DEFAULT_FAILURE_BITS = 20


def _log2_tails(k: int, p: float) -> np.ndarray:
    """T[x] = log2 P[Binomial(k, p) >= x] for x = 0..k+1, in log space so tiny tails don't underflow."""
    tails = np.full(k + 2, -np.inf)
    tails[0] = 0.0
    if p <= 0.0:
        return tails
    if p >= 1.0:
        tails[: k + 1] = 0.0
        return tails
    i = np.arange(k + 1, dtype=np.float64)
    log_comb = np.concatenate(([0.0], np.cumsum(np.log((k - i[1:] + 1) / i[1:]))))
    log_pmf = log_comb + i * math.log(p) + (k - i) * math.log1p(-p)
    # Suffix log-sum-exp: tail(x) = log sum_{i >= x} pmf(i).
    suffix = np.logaddexp.accumulate(log_pmf[::-1])[::-1]
    tails[: k + 1] = np.minimum(suffix / math.log(2), 0.0)
    tails[0] = 0.0
    return tails


def _log2_binom_tail_ge(k: int, p: float, x: int) -> float:
    """log2 P[Binomial(k, p) >= x]."""
    if x <= 0:
        return 0.0
    if x > k:
        return -math.inf
    return float(_log2_tails(k, p)[x])


def minimum_threshold(neighbourhood_size: int) -> int:
    """The smallest threshold that stops a coordinator from splitting a neighbourhood of m sites."""
    return neighbourhood_size // 2 + 1


def default_threshold(neighbourhood_size: int, corrupt: int = 0) -> int:
    return (neighbourhood_size + corrupt) // 2 + 1


@dataclass(frozen=True)
class ParameterChoice:
    """A (k, t) choice with the bounds it achieves (log2 probabilities, union-bounded over sites)."""

    neighbors: int | None
    threshold: int
    corrupt_per_neighbourhood: int
    log2_split_or_disconnect: float
    log2_failure: float


def _corrupt_bound(k: int, g: float, n: int, sigma: int) -> int:
    """Smallest c with n * P[Binomial(k, g) > c] <= 2^-sigma (tails fall as c grows)."""
    target = -sigma - math.log2(n)
    ok = np.flatnonzero(_log2_tails(k, g)[1:] <= target)
    return int(ok[0]) if ok.size else k


def choose_parameters(
    n_sites: int,
    *,
    dropout_rate: float = DEFAULT_DROPOUT_RATE,
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
    security_bits: int = DEFAULT_SECURITY_BITS,
    failure_bits: int = DEFAULT_FAILURE_BITS,
    sparse: bool = True,
) -> ParameterChoice:
    """Smallest even k (or the complete graph) meeting the three requirements in the module doc."""
    problems = []
    if n_sites < 2:
        problems.append(f"n_sites is {n_sites}; secure aggregation needs at least 2 sites")
    if not 0.0 <= dropout_rate < 1.0:
        problems.append(f"dropout_rate {dropout_rate} must be in [0, 1)")
    if not 0.0 <= corrupt_fraction < 0.5:
        problems.append(f"corrupt_fraction {corrupt_fraction} must be in [0, 0.5)")
    if dropout_rate + corrupt_fraction >= 1.0:
        problems.append("dropout_rate + corrupt_fraction must be below 1")
    if problems:
        raise ConfigError(problems)
    n = n_sites
    log2_n = math.log2(n)

    def complete() -> ParameterChoice:
        c = math.ceil(corrupt_fraction * n)
        t = min(default_threshold(n, c), n)
        fail = log2_n + _log2_binom_tail_ge(n - 1, dropout_rate, n - t + 1) if n > 1 else -math.inf
        return ParameterChoice(None, t, c, -math.inf, fail)

    if not sparse:
        return complete()
    for k in range(2, n - 1, 2):
        disconnect = log2_n + k * math.log2(dropout_rate + corrupt_fraction) if (
            dropout_rate + corrupt_fraction
        ) > 0 else -math.inf
        if disconnect > -security_bits:
            continue
        c = _corrupt_bound(k, corrupt_fraction, n, security_bits)
        m = k + 1
        t = default_threshold(m, c)
        if t > m:
            continue
        # Fails when more than m - t of the k neighbours drop (the site itself is alive).
        fail = log2_n + float(_log2_tails(k, dropout_rate)[m - t + 1])
        if fail <= -failure_bits:
            return ParameterChoice(k, t, c, disconnect, fail)
    return complete()
