"""Tests for securefed.primitives.quantize."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.errors import ConfigError
from securefed.primitives.quantize import FixedPointCodec
from securefed.primitives.randomness import SeededRandom, uniform_floats

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "quantize.json").read_text())


def _reference_encode(x: float, u: float, bit_width: int, scale: float, clip: float) -> int:
    v = min(max(x, -clip), clip) * scale
    q = math.floor(v) + (1 if u < v - math.floor(v) else 0)
    return q % 2**bit_width


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_known_answers(case: dict) -> None:
    codec = FixedPointCodec(case["bit_width"], scale=case["scale"], clip=case["clip"])
    encoded = codec.encode_with_uniforms(np.array(case["values"]), np.array(case["uniforms"]))
    assert encoded.dtype == codec.dtype
    assert [int(v) for v in encoded] == case["encoded"]
    reference = [
        _reference_encode(x, u, case["bit_width"], case["scale"], case["clip"])
        for x, u in zip(case["values"], case["uniforms"])
    ]
    assert reference == case["encoded"]
    half = 2 ** (case["bit_width"] - 1)
    signed = [e - 2 * half if e >= half else e for e in case["encoded"]]
    assert codec.decode(encoded).tolist() == [s / case["scale"] for s in signed]


def test_config_validation_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        FixedPointCodec(16, scale=float("nan"), clip=-1.0)
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError):
        FixedPointCodec(scale=2.0**40, clip=1.0)  # one value overflows 32 bits
    with pytest.raises(ConfigError):
        FixedPointCodec(True, scale=1.0, clip=1.0)  # type: ignore[arg-type]
    codec = FixedPointCodec(64, scale=8, clip=2)
    assert codec.dtype is np.uint64 and codec.modulus == 2**64
    assert FixedPointCodec(scale=1.0, clip=1.0).dtype is np.uint32


def test_non_finite_values_rejected_with_count_and_index() -> None:
    codec = FixedPointCodec(scale=16.0, clip=1.0)
    values = np.array([0.0, 1.0, np.nan, 2.0, np.inf, -np.inf])
    with pytest.raises(ConfigError, match=r"3 NaN or infinite entries \(first at flat index 2\)"):
        codec.encode(values, SeededRandom(0))


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-3.0, max_value=3.0), min_size=1, max_size=50),
    bit_width=st.sampled_from([32, 64]),
    log_scale=st.integers(min_value=0, max_value=24),
    seed=st.integers(0, 1000),
)
def test_round_trip_within_error_bound(
    values: list[float], bit_width: int, log_scale: int, seed: int
) -> None:
    codec = FixedPointCodec(bit_width, scale=2.0**log_scale, clip=3.0)
    decoded = codec.decode(codec.encode(np.array(values), SeededRandom(seed)))
    assert np.all(np.abs(decoded - np.array(values)) <= codec.error_bound())
    # Rounded values are within one step below or above: floor or ceil, nothing else.
    scaled = np.array(values) * codec.scale
    assert np.all(
        (decoded * codec.scale == np.floor(scaled)) | (decoded * codec.scale == np.ceil(scaled))
    )


def test_clipping_per_coordinate() -> None:
    codec = FixedPointCodec(scale=4.0, clip=0.5)
    decoded = codec.decode(codec.encode(np.array([10.0, -10.0, 0.25]), SeededRandom(1)))
    assert decoded.tolist() == [0.5, -0.5, 0.25]


def test_stochastic_rounding_is_unbiased() -> None:
    scale, n = 16.0, 200_000
    x = 0.3 / scale + 1.0  # fractional part 0.3 of a step
    codec = FixedPointCodec(scale=scale, clip=4.0)
    decoded = codec.decode(codec.encode(np.full(n, x), SeededRandom("bias")))
    fraction = 0.3
    # Each decode is floor or ceil; its standard deviation is sqrt(f(1-f)) / scale.
    sigma_of_mean = math.sqrt(fraction * (1 - fraction) / n) / scale
    assert abs(decoded.mean() - x) < 5 * sigma_of_mean
    # Rounding to nearest would give a bias of 0.3 / scale, far outside the tolerance.
    assert 0.3 / scale > 50 * sigma_of_mean


def test_sum_of_encodings_decodes_to_sum() -> None:
    codec = FixedPointCodec(scale=2.0**16, clip=1.0)
    rng = SeededRandom(3)
    parts = [np.random.default_rng(i).uniform(-1, 1, size=100) for i in range(10)]
    total = np.zeros(100, dtype=codec.dtype)
    for part in parts:
        np.add(total, codec.encode(part, rng), out=total)
    decoded = codec.decode(total)
    assert np.all(np.abs(decoded - np.sum(parts, axis=0)) <= 10 * codec.error_bound())


@pytest.mark.parametrize("bit_width", [32, 64])
@pytest.mark.parametrize("n_terms", [1, 3, 100, 1000])
@pytest.mark.parametrize("clip", [1.0, 0.37])
def test_capacity_bound_is_tight_and_correct(bit_width: int, n_terms: int, clip: float) -> None:
    scale = FixedPointCodec.max_safe_scale(clip=clip, n_terms=n_terms, bit_width=bit_width)
    assert scale == 2.0 ** math.floor(math.log2(scale))  # a power of two
    codec = FixedPointCodec(bit_width, scale=scale, clip=clip)
    codec.check_capacity(n_terms)
    for sign in (1.0, -1.0):
        # Uniforms of 0 round up, uniforms just below 1 round down: each term hits the bound.
        uniform = 0.0 if sign > 0 else np.nextafter(1.0, 0.0)
        worst = codec.encode_with_uniforms(np.full(4, sign * clip), np.full(4, uniform))
        assert np.all(np.abs(codec.decode(worst) * scale) == codec.max_magnitude())
        total = np.zeros(4, dtype=codec.dtype)
        for _ in range(n_terms):
            np.add(total, worst, out=total)
        expected = n_terms * codec.decode(worst)
        assert np.array_equal(codec.decode(total), expected)
    # The next power of two must be refused (for one term, already by the constructor).
    with pytest.raises(ConfigError, match="lower"):
        FixedPointCodec(bit_width, scale=2 * scale, clip=clip).check_capacity(n_terms)


def test_overflow_really_happens_beyond_the_bound() -> None:
    n_terms = 3
    scale = FixedPointCodec.max_safe_scale(clip=1.0, n_terms=n_terms)
    unsafe = FixedPointCodec(scale=2 * scale, clip=1.0)
    with pytest.raises(ConfigError) as info:
        unsafe.check_capacity(n_terms)
    message = str(info.value)
    for fragment in ("3 sites", "+/-1", f"{2 * scale:g}", "32-bit", f"{scale:g}", "bit_width=64"):
        assert fragment in message
    one = unsafe.encode_with_uniforms(np.array([1.0]), np.zeros(1))
    total = one * np.uint32(n_terms)
    assert unsafe.decode(total)[0] != n_terms * 1.0  # the wrap the check exists to prevent


def test_max_safe_scale_validation() -> None:
    with pytest.raises(ConfigError):
        FixedPointCodec.max_safe_scale(clip=0.0, n_terms=2)
    with pytest.raises(ConfigError):
        FixedPointCodec.max_safe_scale(clip=1.0, n_terms=0)
    with pytest.raises(ConfigError):
        FixedPointCodec.max_safe_scale(clip=1.0, n_terms=2**31)
    with pytest.raises(ConfigError):
        FixedPointCodec(scale=1.0, clip=1.0).check_capacity(0)


def test_max_magnitude_and_error_bound() -> None:
    codec = FixedPointCodec(scale=10.0, clip=0.35)
    assert codec.max_magnitude() == 4
    assert codec.error_bound() == 0.1


def test_decode_accepts_wrapped_integer_types() -> None:
    codec = FixedPointCodec(scale=2.0, clip=8.0)
    assert codec.decode(np.array([-3, 4], dtype=np.int64)).tolist() == [-1.5, 2.0]
    with pytest.raises(ConfigError):
        codec.decode(np.array([1.0]))


def test_encode_is_fast() -> None:
    codec = FixedPointCodec(scale=2.0**16, clip=1.0)
    values = np.random.default_rng(0).normal(size=1_000_000)
    rng = SeededRandom(0)
    codec.encode(values, rng)
    best = min(_timed(lambda: codec.encode(values, rng)) for _ in range(3))
    assert best < 0.05


def _timed(function: object) -> float:
    start = time.perf_counter()
    function()  # type: ignore[operator]
    return time.perf_counter() - start


def _encode_from_uniforms(codec: FixedPointCodec, values: np.ndarray, seed: int) -> np.ndarray:
    """The rule encode follows, spelled out with whole-array float64 operations."""
    x = np.asarray(values).astype(np.float64)
    u = uniform_floats(SeededRandom(seed), x.size).reshape(x.shape)
    v = np.clip(x, -codec.clip, codec.clip) * codec.scale
    q = np.floor(v) + (u < v - np.floor(v))
    return q.astype(np.int64).astype(codec.dtype)


@pytest.mark.parametrize("block", [5, 4096, 1 << 16])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "int32", "uint8"])
@pytest.mark.parametrize("bit_width", [32, 64])
def test_blocked_encode_matches_the_whole_array_rule(
    monkeypatch: pytest.MonkeyPatch, block: int, dtype: str, bit_width: int
) -> None:
    from securefed.primitives import quantize

    monkeypatch.setattr(quantize, "_BLOCK", block)
    clip = 3.0
    scale = FixedPointCodec.max_safe_scale(clip=clip, n_terms=1, bit_width=bit_width)
    codec = FixedPointCodec(bit_width, scale=scale, clip=clip)
    generator = np.random.default_rng(block)
    raw = generator.normal(scale=2.0, size=(3, 4001))
    raw[0, :20] = [0.0, -0.0, clip, -clip, 6e4, -6e4, 3.0000001, 2.9999999] + [0.5] * 12
    with np.errstate(over="ignore", invalid="ignore"):
        values = raw.astype(dtype)
    rng = SeededRandom(7)
    encoded = codec.encode(values, rng)
    assert encoded.dtype == codec.dtype and encoded.shape == values.shape
    assert np.array_equal(encoded, _encode_from_uniforms(codec, values, 7))
    # The stream moved on by exactly the words uniform_floats would have read.
    after = SeededRandom(7)
    uniform_floats(after, values.size)
    assert rng.random_bytes(8) == after.random_bytes(8)
    # A strided view and an explicit uniforms array follow the same rule.
    strided = values[:, ::3]
    expected = _encode_from_uniforms(codec, strided, 8)
    assert np.array_equal(codec.encode(strided, SeededRandom(8)), expected)
    uniforms = uniform_floats(SeededRandom(9), values.size).reshape(values.shape)
    expected = codec.encode(values, SeededRandom(9))
    assert np.array_equal(codec.encode_with_uniforms(values, uniforms), expected)


class _OnlyBytes:
    def __init__(self, seed: int) -> None:
        self.inner = SeededRandom(seed)

    def random_bytes(self, n: int) -> bytes:
        return self.inner.random_bytes(n)


def test_encode_with_another_random_source(monkeypatch: pytest.MonkeyPatch) -> None:
    from securefed.primitives import quantize

    monkeypatch.setattr(quantize, "_BLOCK", 64)
    codec = FixedPointCodec(scale=2.0**10, clip=1.0)
    values = np.random.default_rng(1).uniform(-1.5, 1.5, size=1000)
    expected = codec.encode(values, SeededRandom(3))
    assert np.array_equal(codec.encode(values, _OnlyBytes(3)), expected)


def test_non_finite_values_found_in_large_arrays() -> None:
    codec = FixedPointCodec(scale=16.0, clip=1.0)
    values = np.zeros(300_000, dtype=np.float32)
    values[[123_456, 200_000]] = [np.inf, np.nan]
    rng = SeededRandom(0)
    message = r"2 NaN or infinite entries \(first at flat index 123456\)"
    with pytest.raises(ConfigError, match=message):
        codec.encode(values, rng)
    # Nothing was drawn from the stream for the rejected input.
    assert rng.random_bytes(8) == SeededRandom(0).random_bytes(8)
    # Wider floats are checked after conversion: a value beyond float64's range is infinite.
    wide = np.array([1.0, np.inf, np.longdouble("1e400")], dtype=np.longdouble)
    with np.errstate(over="ignore"), pytest.raises(ConfigError, match="2 NaN or infinite"):
        codec.encode(wide, rng)
