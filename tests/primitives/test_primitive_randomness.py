"""Tests for securefed.primitives.randomness."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from securefed.errors import ConfigError
from securefed.primitives.randomness import (
    RandomSource,
    SeededRandom,
    SystemRandom,
    default_random,
    uniform_below,
    uniform_floats,
)

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "seeded_random.json").read_text())


def _seed_of(case: dict) -> int | bytes | str:
    if case["seed_type"] == "bytes":
        return bytes.fromhex(case["seed"])
    return case["seed"]


def _independent_stream(key: bytes, n: int) -> bytes:
    """AES-256 of counter blocks 0, 1, 2, ... computed block by block with ECB."""
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = b"".join(i.to_bytes(16, "big") for i in range(-(-n // 16)))
    return encryptor.update(blocks)[:n]


def _independent_key(seed: int | bytes | str) -> bytes:
    if isinstance(seed, int):
        encoded = b"int\x00" + str(seed).encode()
    elif isinstance(seed, bytes):
        encoded = b"bytes\x00" + seed
    else:
        encoded = b"str\x00" + seed.encode()
    return hashlib.sha256(b"securefed/SeededRandom/seed/v1\x00" + encoded).digest()


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: f"{c['seed_type']}-{c['seed']}")
def test_seeded_random_known_answers(case: dict) -> None:
    seed = _seed_of(case)
    rng = SeededRandom(seed)
    assert rng.random_bytes(48).hex() == case["first_bytes"]
    assert rng.fork(case["fork_label"]).random_bytes(32).hex() == case["fork_first_bytes"]
    # The vector itself is checked against a from-scratch computation of the construction.
    key = _independent_key(seed)
    assert _independent_stream(key, 48).hex() == case["first_bytes"]
    child = hashlib.sha256(b"securefed/SeededRandom/fork/v1\x00" + key + b"party-1").digest()
    assert _independent_stream(child, 32).hex() == case["fork_first_bytes"]


def test_seeded_random_is_deterministic_and_streams_continuously() -> None:
    a, b = SeededRandom(42), SeededRandom(42)
    whole = a.random_bytes(100)
    assert b.random_bytes(37) + b.random_bytes(63) == whole
    assert SeededRandom(43).random_bytes(100) != whole


def test_seed_types_do_not_collide() -> None:
    outputs = {SeededRandom(s).random_bytes(16) for s in (1, "1", b"1")}
    assert len(outputs) == 3


def test_fork_is_independent_of_parent_position_and_label() -> None:
    parent = SeededRandom("federation")
    early = parent.fork("site-a").random_bytes(32)
    parent.random_bytes(1000)
    late = parent.fork("site-a").random_bytes(32)
    assert early == late
    other = parent.fork("site-b").random_bytes(32)
    assert other != early
    # The child stream is not a shifted copy of the parent stream.
    assert early not in SeededRandom("federation").random_bytes(4096)


def test_seeded_random_repr_hides_seed() -> None:
    assert "secret-seed" not in repr(SeededRandom("secret-seed"))


def test_bad_seed_types_rejected() -> None:
    with pytest.raises(ConfigError):
        SeededRandom(True)
    with pytest.raises(ConfigError):
        SeededRandom(1.5)  # type: ignore[arg-type]


def test_default_random_and_protocol() -> None:
    assert isinstance(default_random(None), SystemRandom)
    seeded = default_random(7)
    assert isinstance(seeded, SeededRandom)
    assert seeded.random_bytes(8) == SeededRandom(7).random_bytes(8)
    assert isinstance(SystemRandom(), RandomSource)
    assert len(SystemRandom().random_bytes(33)) == 33
    with pytest.raises(ConfigError):
        SystemRandom().random_bytes(-1)


def test_uniform_floats_range_and_resolution() -> None:
    values = uniform_floats(SeededRandom(1), 100_000)
    assert values.dtype == np.float64 and values.shape == (100_000,)
    assert values.min() >= 0.0 and values.max() < 1.0
    # 53-bit values: every one is an exact multiple of 2**-53, and most use the low bits.
    scaled = values * 2.0**53
    assert np.array_equal(scaled, np.floor(scaled))
    assert np.mean(scaled % 2 == 1) > 0.45
    # Mean of n uniforms has standard deviation sqrt(1/12/n); allow 6 of them.
    assert abs(values.mean() - 0.5) < 6 * np.sqrt(1 / 12 / values.size)


@pytest.mark.parametrize("bound", [1, 2, 3, 7, 2**31 - 1, 2**32 + 1, 2**63])
def test_uniform_below_bounds(bound: int) -> None:
    values = uniform_below(SeededRandom(bound), bound, 20_000)
    assert values.dtype == np.uint64 and values.size == 20_000
    assert int(values.max()) < bound
    if bound == 1:
        assert not values.any()


def test_uniform_below_is_uniform() -> None:
    # bound 3 rejects a quarter of the masked draws: a biased reducer (e.g. modulo) would fail.
    bound, n = 3, 90_000
    counts = np.bincount(
        uniform_below(SeededRandom("chi"), bound, n).astype(np.int64), minlength=bound
    )
    expected = n / bound
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.0  # chi-square, 2 degrees of freedom: P(> 20) is about 5e-5


def test_uniform_below_top_bit_reached_for_large_bound() -> None:
    values = uniform_below(SeededRandom(5), 2**63, 1000)
    assert (values >= np.uint64(2**62)).mean() > 0.4


def test_uniform_below_rejects_bad_bounds() -> None:
    for bad in (0, -1, 2**63 + 1):
        with pytest.raises(ConfigError):
            uniform_below(SeededRandom(0), bad, 3)


@pytest.fixture
def small_fill_chunk(monkeypatch: pytest.MonkeyPatch):
    """Shrink the fill chunk so small requests span several update_into calls."""
    from securefed.primitives import randomness

    monkeypatch.setattr(randomness, "_FILL_CHUNK", 40)
    randomness._zeros.cache_clear()
    yield
    randomness._zeros.cache_clear()


@pytest.mark.parametrize("chunked", [False, True])
def test_word_fills_continue_the_random_bytes_stream(
    request: pytest.FixtureRequest, chunked: bool
) -> None:
    if chunked:
        request.getfixturevalue("small_fill_chunk")
    from securefed.primitives.randomness import _consume_words

    reference = SeededRandom("fill").random_bytes(20_000)
    rng = SeededRandom("fill")
    pieces = [rng.random_bytes(3)]
    words = np.empty(101, dtype=np.uint64)
    assert rng.fill_uniform_words(words) is words
    pieces.append(words.astype("<u8").tobytes())
    pieces.append(rng.random_bytes(77))
    grid = np.empty((3, 5), dtype=np.uint64)
    pieces.append(rng.fill_uniform_words(grid).astype("<u8").tobytes())
    blocks: list[bytes] = []
    _consume_words(rng, 250, 64, lambda w, start: blocks.append(w.astype("<u8").tobytes()))
    assert [len(b) for b in blocks] == [512, 512, 512, 464]
    pieces.extend(blocks)
    pieces.append(rng.fill_uniform_words(np.empty(0, dtype=np.uint64)).tobytes())
    pieces.append(rng.random_bytes(1000))
    pieces.append(rng.random_bytes(5000))
    joined = b"".join(pieces)
    assert joined == reference[: len(joined)]


@pytest.mark.parametrize("chunked", [False, True])
def test_samplers_read_words_as_random_bytes_would(
    request: pytest.FixtureRequest, chunked: bool
) -> None:
    if chunked:
        request.getfixturevalue("small_fill_chunk")
    n = 1000
    words = np.frombuffer(SeededRandom(9).random_bytes(8 * n), dtype="<u8")
    expected = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
    rng = SeededRandom(9)
    assert np.array_equal(uniform_floats(rng, n), expected)
    assert rng.random_bytes(16) == SeededRandom(9).random_bytes(8 * n + 16)[-16:]
    # uniform_below: the first draw covers n with surplus, each masked word is kept if < bound.
    bound = 2**31 - 1
    draws = int(n * ((2**31) / bound) * 1.02) + 32
    masked = np.frombuffer(SeededRandom(4).random_bytes(8 * draws), dtype="<u8") & np.uint64(
        2**31 - 1
    )
    assert np.array_equal(uniform_below(SeededRandom(4), bound, n), masked[masked < bound][:n])


class _Recorded:
    """A RandomSource of another kind: only random_bytes, and it counts the calls."""

    def __init__(self, seed: int) -> None:
        self.inner = SeededRandom(seed)
        self.calls = 0

    def random_bytes(self, n: int) -> bytes:
        self.calls += 1
        return self.inner.random_bytes(n)


class _Reversed(SeededRandom):
    """A subclass with its own random_bytes: the samplers must use it."""

    __slots__ = ()

    def random_bytes(self, n: int) -> bytes:
        return super().random_bytes(n)[::-1]


def test_samplers_fall_back_to_random_bytes() -> None:
    other, seeded = _Recorded(5), SeededRandom(5)
    assert np.array_equal(uniform_floats(other, 300), uniform_floats(seeded, 300))
    assert np.array_equal(uniform_below(other, 7, 300), uniform_below(seeded, 7, 300))
    assert other.calls >= 2
    reversed_bytes = SeededRandom(5).random_bytes(8 * 300)[::-1]
    expected = (np.frombuffer(reversed_bytes, dtype="<u8") >> np.uint64(11)) * 2.0**-53
    assert np.array_equal(uniform_floats(_Reversed(5), 300), expected)


def test_system_random_fills_words(small_fill_chunk: None) -> None:
    words = SystemRandom().fill_uniform_words(np.zeros(1001, dtype=np.uint64))
    assert np.count_nonzero(words) > 990 and np.unique(words).size > 990
    values = uniform_floats(SystemRandom(), 5000)
    assert values.min() >= 0.0 and values.max() < 1.0
    assert int(uniform_below(SystemRandom(), 10, 5000).max()) < 10


@pytest.mark.parametrize("source", [SeededRandom(0), SystemRandom()], ids=repr)
def test_fill_uniform_words_rejects_unsuitable_arrays(source: RandomSource) -> None:
    for bad in (
        [0, 0],
        np.zeros(4, dtype=np.uint32),
        np.zeros(4, dtype=">u8" if np.little_endian else "<u8"),
        np.zeros(8, dtype=np.uint64)[::2],
    ):
        with pytest.raises(ConfigError):
            source.fill_uniform_words(bad)  # type: ignore[attr-defined]
    frozen = np.zeros(4, dtype=np.uint64)
    frozen.flags.writeable = False
    with pytest.raises(ConfigError):
        source.fill_uniform_words(frozen)  # type: ignore[attr-defined]
