"""Configuration of secure aggregation: what the user sets, and the signed per-round record.

:class:`SecAggConfig` is what a user writes. :class:`RoundConfig` is what every party of one
round agrees on: the coordinator sends it, each client validates it and binds its digest into
every signature it makes, so a coordinator that shows different configurations to different
clients, or changes the threshold after setup, is caught.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from securefed.errors import ConfigError, MalformedMessageError
from securefed.primitives.quantize import FixedPointCodec
from securefed.secagg.params import (
    DEFAULT_CORRUPT_FRACTION,
    DEFAULT_DROPOUT_RATE,
    DEFAULT_FAILURE_BITS,
    DEFAULT_SECURITY_BITS,
    choose_parameters,
    default_threshold,
    minimum_threshold,
)
from securefed.serialization import Reader, Writer

if TYPE_CHECKING:
    from securefed.primitives.roster import Roster

__all__ = ["SecAggConfig", "RoundConfig", "PROTOCOL_VERSION", "weaker_than", "round_config_problems"]

PROTOCOL_VERSION = 1
MAX_VECTOR_LENGTH = 1 << 31
MAX_SITES = 1 << 16
_SEED_SIZE = 32


def _finite_positive(name: str, value: object, problems: list[str]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{name} must be a number, got {type(value).__name__}")
    elif not math.isfinite(value) or value <= 0:
        problems.append(f"{name} must be a finite positive number, got {value!r}")


@dataclass(frozen=True)
class SecAggConfig:
    """User-facing settings of secure aggregation.

    neighbors:  ``None`` for the complete graph (classic SecAgg), ``"auto"`` for the smallest
                sparse graph meeting the stated bounds (see :mod:`securefed.secagg.params`),
                or an even k for a k-regular graph (SecAgg+).
    threshold:  Shamir threshold t per neighbourhood; ``None`` picks the default (tolerating the
                stated corrupt fraction). Must exceed half of each neighbourhood.
    bit_width:  32 (default) or 64: the ring Z_(2^b) the masked values live in.
    clip:       each coordinate of an input is clipped to [-clip, clip] before encoding.
    scale:      fixed-point scale; ``None`` picks the largest power of two that cannot overflow.
    max_weight: the largest weight a site may use (a public bound; weights are sent masked).
    """

    neighbors: int | str | None = None
    threshold: int | None = None
    bit_width: int = 32
    clip: float = 1.0
    scale: float | None = None
    max_weight: float = 1.0
    dropout_rate: float = DEFAULT_DROPOUT_RATE
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION
    security_bits: int = DEFAULT_SECURITY_BITS
    failure_bits: int = DEFAULT_FAILURE_BITS

    def __post_init__(self) -> None:
        problems: list[str] = []
        k = self.neighbors
        if k is not None and k != "auto":
            if isinstance(k, bool) or not isinstance(k, int):
                problems.append(f"neighbors must be None, 'auto' or an even integer, got {k!r}")
            elif k < 2 or k % 2:
                problems.append(
                    f"neighbors={k} must be an even integer >= 2 (a Harary ring joins k/2 sites on "
                    "each side); use None for the complete graph"
                )
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 2):
            problems.append(f"threshold must be None or an integer >= 2, got {t!r}")
        if self.bit_width not in (32, 64):
            problems.append(f"bit_width must be 32 or 64, got {self.bit_width!r}")
        _finite_positive("clip", self.clip, problems)
        if self.scale is not None:
            _finite_positive("scale", self.scale, problems)
        _finite_positive("max_weight", self.max_weight, problems)
        if not 0.0 <= self.dropout_rate < 1.0:
            problems.append(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if not 0.0 <= self.corrupt_fraction < 0.5:
            problems.append(f"corrupt_fraction must be in [0, 0.5), got {self.corrupt_fraction!r}")
        numbers_ok = self.bit_width in (32, 64) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in (self.clip, self.max_weight, self.scale if self.scale is not None else 1.0)
        )
        if numbers_ok and self.scale is not None:
            try:  # a scale that overflows even one value is wrong for any number of sites
                FixedPointCodec(bit_width=self.bit_width, scale=self.scale, clip=self.clip * self.max_weight)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)

    def resolve(self, n_sites: int) -> tuple[int | None, int]:
        """The (neighbors, threshold) this config gives for ``n_sites``; ConfigError if unsafe."""
        if self.neighbors == "auto":
            choice = choose_parameters(
                n_sites,
                dropout_rate=self.dropout_rate,
                corrupt_fraction=self.corrupt_fraction,
                security_bits=self.security_bits,
                failure_bits=self.failure_bits,
            )
            k, t = choice.neighbors, choice.threshold
        else:
            k = self.neighbors if isinstance(self.neighbors, int) else None
            if k is not None and k >= n_sites - 1:
                k = None
            m = n_sites if k is None else k + 1
            corrupt = math.ceil(self.corrupt_fraction * m)
            t = min(default_threshold(m, corrupt), m)
        if self.threshold is not None:
            t = self.threshold
        return k, t

    def round_config(
        self,
        *,
        n_sites: int,
        vector_length: int,
        round_id: int,
        roster_digest: bytes,
        graph_seed: bytes,
        participants: tuple[int, ...] | None = None,
    ) -> RoundConfig:
        k, t = self.resolve(n_sites)
        max_value = self.clip * self.max_weight
        scale = self.scale
        if scale is None:
            scale = FixedPointCodec.max_safe_scale(
                clip=max_value, n_terms=n_sites, bit_width=self.bit_width
            )
        config = RoundConfig(
            round_id=round_id,
            roster_digest=roster_digest,
            participants=participants if participants is not None else tuple(range(n_sites)),
            threshold=t,
            neighbors=k,
            graph_seed=graph_seed,
            vector_length=vector_length,
            bit_width=self.bit_width,
            clip=float(self.clip),
            scale=float(scale),
            max_weight=float(self.max_weight),
        )
        problems = config.problems()
        if problems:
            raise ConfigError(problems)
        return config


@dataclass(frozen=True)
class RoundConfig:
    """Everything the parties of one round must agree on. Its digest is signed by every client."""

    round_id: int
    roster_digest: bytes
    participants: tuple[int, ...]
    threshold: int
    neighbors: int | None
    graph_seed: bytes
    vector_length: int
    bit_width: int
    clip: float
    scale: float
    max_weight: float
    version: int = PROTOCOL_VERSION
    _digest: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            encoded = self.encode()
        except (ValueError, TypeError, OverflowError):
            encoded = b""  # malformed fields; problems() reports them and no party accepts it
        object.__setattr__(self, "_digest", hashlib.sha256(encoded).digest() if encoded else b"")

    @property
    def n_sites(self) -> int:
        return len(self.participants)

    @property
    def neighbourhood_size(self) -> int:
        if self.neighbors is None or self.neighbors >= self.n_sites - 1:
            return self.n_sites
        return self.neighbors + 1

    @property
    def digest(self) -> bytes:
        return self._digest

    def value_codec(self) -> FixedPointCodec:
        return FixedPointCodec(
            bit_width=self.bit_width, scale=self.scale, clip=self.clip * self.max_weight
        )

    def weight_codec(self) -> FixedPointCodec:
        scale = FixedPointCodec.max_safe_scale(
            clip=self.max_weight, n_terms=self.n_sites, bit_width=self.bit_width
        )
        return FixedPointCodec(bit_width=self.bit_width, scale=scale, clip=self.max_weight)

    def problems(self) -> list[str]:
        """Every reason this configuration is unsafe or unusable (empty when it is fine)."""
        problems: list[str] = []
        n = self.n_sites
        if self.version != PROTOCOL_VERSION:
            problems.append(f"protocol version {self.version} is not supported (expected {PROTOCOL_VERSION})")
        if n < 2:
            problems.append(f"{n} participant(s); secure aggregation needs at least 2 sites")
        if n > MAX_SITES:
            problems.append(f"{n} participants is more than the supported {MAX_SITES}")
        if len(set(self.participants)) != n:
            problems.append("participants contains duplicate site ids")
        if list(self.participants) != sorted(self.participants):
            problems.append("participants must be listed in increasing order")
        if len(self.roster_digest) != 32:
            problems.append("roster_digest must be 32 bytes")
        if len(self.graph_seed) != _SEED_SIZE:
            problems.append(f"graph_seed must be {_SEED_SIZE} bytes")
        if self.neighbors is not None and (self.neighbors < 2 or self.neighbors % 2):
            problems.append(f"neighbors={self.neighbors} must be an even integer >= 2")
        m = self.neighbourhood_size
        floor_t = minimum_threshold(m)
        if self.threshold < floor_t:
            problems.append(
                f"threshold {self.threshold} is below the minimum {floor_t} for neighbourhoods of "
                f"{m} sites (it must exceed half of each neighbourhood so the coordinator cannot "
                "split the cohort); raise threshold or add sites"
            )
        if self.threshold > m:
            problems.append(
                f"threshold {self.threshold} is more than the {m} sites of a neighbourhood; "
                "lower threshold or add neighbours"
            )
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            problems.append(f"vector_length {self.vector_length} must be between 1 and {MAX_VECTOR_LENGTH}")
        if self.bit_width not in (32, 64):
            problems.append(f"bit_width must be 32 or 64, got {self.bit_width}")
        for name in ("clip", "scale", "max_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite positive number, got {value!r}")
        if not problems:
            try:
                self.value_codec().check_capacity(n)
            except ConfigError as exc:
                problems.extend(exc.problems)
        return problems

    # -- wire format ------------------------------------------------------------------------
    def encode(self) -> bytes:
        w = Writer().fixed(b"SFRC", 4).u8(self.version).u64(self.round_id)
        w.fixed(self.roster_digest, 32)
        w.u32_list(list(self.participants)).u32(self.threshold).u32(self.neighbors or 0)
        w.fixed(self.graph_seed, _SEED_SIZE).u64(self.vector_length).u8(self.bit_width)
        w.f64(self.clip).f64(self.scale).f64(self.max_weight)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> RoundConfig:
        r = Reader(data, what="round configuration")
        if r.fixed(4, "magic") != b"SFRC":
            raise MalformedMessageError("round configuration: bad magic bytes")
        version = r.u8("version")
        if version != PROTOCOL_VERSION:
            raise MalformedMessageError(
                f"round configuration: version {version} is not supported (expected {PROTOCOL_VERSION})"
            )
        round_id = r.u64("round id")
        roster_digest = r.fixed(32, "roster digest")
        participants = r.u32_list("participants", max_count=MAX_SITES)
        threshold = r.u32("threshold")
        k = r.u32("neighbors")
        graph_seed = r.fixed(_SEED_SIZE, "graph seed")
        vector_length = r.u64("vector length")
        bit_width = r.u8("bit width")
        clip, scale, max_weight = r.f64("clip"), r.f64("scale"), r.f64("max weight")
        r.finish()
        return cls(
            round_id=round_id,
            roster_digest=roster_digest,
            participants=participants,
            threshold=threshold,
            neighbors=k or None,
            graph_seed=graph_seed,
            vector_length=vector_length,
            bit_width=bit_width,
            clip=clip,
            scale=scale,
            max_weight=max_weight,
        )


def weaker_than(config: RoundConfig, policy: SecAggConfig) -> list[str]:
    """How ``config`` falls short of what ``policy`` gives for the same number of sites."""
    problems = []
    k, t = policy.resolve(config.n_sites)
    if config.threshold < t:
        problems.append(f"threshold {config.threshold} is below the agreed {t}")
    complete = config.neighbourhood_size == config.n_sites
    if k is None and not complete:
        problems.append("the agreed graph is complete, this round's is sparse")
    elif k is not None and not complete and (config.neighbors or 0) < k:
        problems.append(f"{config.neighbors} neighbours is fewer than the agreed {k}")
    if config.bit_width != policy.bit_width or config.clip != policy.clip:
        problems.append("bit width or clip differs from the agreed settings")
    if config.max_weight != policy.max_weight:
        problems.append("max_weight differs from the agreed setting")
    return problems


def round_config_problems(config: RoundConfig, *, roster: Roster, site_id: int,
                          policy: SecAggConfig | None) -> list[str]:
    """Why site ``site_id`` must refuse ``config`` (besides replay and its own input): unsafe
    parameters, another roster, not a participant, weaker than the agreed ``policy``."""
    problems = config.problems()
    if config.roster_digest != roster.digest():
        problems.append("the round is for a different federation roster")
    if site_id not in config.participants:
        problems.append("this site is not a participant of the round")
    if policy is not None and not problems:
        problems.extend(weaker_than(config, policy))
    outside = [p for p in config.participants if p >= len(roster)]
    if outside:
        problems.append(f"participants {outside[:5]} are not in the roster of {len(roster)} sites")
    return problems
