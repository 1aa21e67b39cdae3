"""Honest secure-aggregation rounds: the result is the plain sum, and the coordinator learns nothing else."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from secagg_helpers import STAGE_NAMES, contains_window, max_exact_error
from securefed.errors import ConfigError
from securefed.primitives.randomness import SeededRandom
from securefed.secagg import SecAggConfig, Stage, choose_parameters, secure_sum
from securefed.secagg.client import encode_input
from securefed.secagg.graph import NeighbourGraph
from securefed.secagg.messages import MaskedInput, decode_message

HEADER_ALLOWANCE = 72  # bytes of framing a masked upload may add on top of its values (complete graph)


def _vectors(n: int, length: int, seed: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, size=(n, length))


def _assert_within_quantisation(result, rows, n_terms: int) -> None:
    """Every coordinate within n_terms / scale of the exact sum (plus float64's own rounding at b=64)."""
    bound = Fraction(n_terms) / Fraction(result.config.scale)
    if result.config.bit_width == 64:
        # A float64 cannot hold a 64-bit fixed-point sum exactly: allow one ulp of the result.
        bound += Fraction(float(np.max(np.spacing(np.abs(result.total)))))
    error = max_exact_error(result.total, rows)
    assert error <= bound, f"error {float(error):.3g} exceeds the bound {float(bound):.3g}"


# ------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("bit_width", [32, 64])
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_complete_graph_sum_matches_plain_sum(n: int, bit_width: int) -> None:
    vectors = _vectors(n, 17, seed=n * 100 + bit_width)
    result = secure_sum(vectors, SecAggConfig(bit_width=bit_width), seed=f"complete-{n}", workers=1)
    assert result.config.neighbors is None
    assert result.config.bit_width == bit_width
    assert result.total.shape == (17,) and result.total.dtype == np.float64
    _assert_within_quantisation(result, vectors, n)
    assert result.survivors == set(range(n))
    assert result.total_weight == pytest.approx(n, abs=n / result.config.weight_codec().scale)


@pytest.mark.parametrize("bit_width", [32, 64])
@pytest.mark.parametrize("n", [10, 12])
def test_sparse_graph_sum_matches_plain_sum(n: int, bit_width: int) -> None:
    vectors = _vectors(n, 23, seed=n + bit_width)
    result = secure_sum(vectors, SecAggConfig(neighbors=4, bit_width=bit_width), seed=f"sparse-{n}", workers=1)
    assert result.config.neighbors == 4
    assert result.config.neighbourhood_size == 5
    assert 2 * result.config.threshold > 5 and result.config.threshold <= 5
    _assert_within_quantisation(result, vectors, n)
    assert result.survivors == set(range(n))


def test_sparse_graph_really_is_sparse() -> None:
    """With neighbors=4 the shares each site uploads go to exactly 4 peers, not to everyone."""
    n = 10
    result = secure_sum(_vectors(n, 5, 3), SecAggConfig(neighbors=4), seed="sparse-check", workers=1)
    graph = NeighbourGraph(result.config.participants, result.config.neighbors, result.config.graph_seed)
    for m in result.coordinator_view.messages:
        if m.stage is Stage.SHARE_KEYS:
            bundle = decode_message(m.data)
            assert {item.recipient for item in bundle.items} == set(graph.neighbours(m.sender))
            assert len(bundle.items) == 4


def test_two_neighbour_ring() -> None:
    vectors = _vectors(11, 9, 5)
    result = secure_sum(vectors, SecAggConfig(neighbors=2), seed="ring", workers=1)
    assert result.config.neighbors == 2 and result.config.threshold == 2
    _assert_within_quantisation(result, vectors, 11)


@pytest.mark.parametrize("dropout_rate, expect_sparse", [(0.1, False), (0.01, True)])
def test_auto_neighbours(dropout_rate: float, expect_sparse: bool) -> None:
    n = 12
    config = SecAggConfig(neighbors="auto", dropout_rate=dropout_rate)
    vectors = _vectors(n, 11, 8)
    result = secure_sum(vectors, config, seed="auto", workers=1)
    choice = choose_parameters(n, dropout_rate=dropout_rate)
    assert result.config.neighbors == choice.neighbors
    assert result.config.threshold == choice.threshold
    assert (result.config.neighbors is not None) == expect_sparse
    _assert_within_quantisation(result, vectors, n)


@pytest.mark.slow
def test_auto_neighbours_default_settings_go_sparse_at_28_sites() -> None:
    n = 28
    vectors = _vectors(n, 5, 28)
    result = secure_sum(vectors, SecAggConfig(neighbors="auto"), seed="auto-28", workers=2)
    assert result.config.neighbors is not None and result.config.neighbors < n - 1
    assert result.config.neighbors % 2 == 0
    _assert_within_quantisation(result, vectors, n)


def test_explicit_scale_is_used_and_bounds_error() -> None:
    vectors = _vectors(4, 30, 9)
    result = secure_sum(vectors, SecAggConfig(scale=2.0**10), seed="coarse", workers=1)
    assert result.config.scale == 2.0**10
    _assert_within_quantisation(result, vectors, 4)
    # At this coarse scale the result is visibly quantised: every entry is a multiple of 2**-10.
    assert np.all(result.total * 2**10 == np.round(result.total * 2**10))


def test_integer_inputs_and_2d_array_input() -> None:
    ints = [np.array([1, 0, -1, 1]), np.array([0, 1, 1, -1]), np.array([1, 1, 1, 1])]
    result = secure_sum(ints, seed="ints", workers=1)
    assert np.abs(result.total - np.array([2, 2, 1, 1])).max() <= 3 / result.config.scale
    matrix = _vectors(3, 6, 10)
    from_matrix = secure_sum(matrix, seed="matrix", workers=1)
    _assert_within_quantisation(from_matrix, matrix, 3)


def test_threaded_workers_match_single_thread() -> None:
    vectors = _vectors(6, 12, 11)
    one = secure_sum(vectors, seed="threads", workers=1)
    many = secure_sum(vectors, seed="threads", workers=3)
    np.testing.assert_array_equal(one.total, many.total)
    assert [m.data for m in one.coordinator_view.messages] == [m.data for m in many.coordinator_view.messages]


# ------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("neighbors", [None, 4])
def test_weighted_sum_total_weight_and_mean(neighbors) -> None:
    n = 9
    vectors = _vectors(n, 15, 12)
    weights = np.random.default_rng(13).uniform(0.0, 3.0, size=n)
    weights[2] = 0.0  # a site may contribute nothing
    config = SecAggConfig(neighbors=neighbors, max_weight=3.0)
    result = secure_sum(vectors, config, weights=weights, seed="weighted", workers=1)
    weighted_rows = [w * v for w, v in zip(weights, vectors)]
    bound = n / result.config.scale + 1e-12
    assert np.abs(result.total - np.sum(weighted_rows, axis=0)).max() <= bound
    weight_bound = n / result.config.weight_codec().scale + 1e-12
    assert abs(result.total_weight - weights.sum()) <= weight_bound
    plain_mean = np.sum(weighted_rows, axis=0) / weights.sum()
    np.testing.assert_allclose(result.mean, result.total / result.total_weight)
    assert np.abs(result.mean - plain_mean).max() <= 1e-6


def test_weighted_sum_with_dropout_counts_only_survivors() -> None:
    n = 7
    vectors = _vectors(n, 8, 14)
    weights = [0.5, 1.0, 1.5, 2.0, 0.25, 1.75, 1.0]
    result = secure_sum(
        vectors, SecAggConfig(max_weight=2.0), weights=weights, dropouts={"masked_input": [1, 4]},
        seed="weighted-drop", workers=1,
    )
    alive = [i for i in range(n) if i not in (1, 4)]
    assert result.survivors == set(alive)
    expected = sum(weights[i] * vectors[i] for i in alive)
    assert np.abs(result.total - expected).max() <= n / result.config.scale + 1e-12
    assert result.total_weight == pytest.approx(sum(weights[i] for i in alive), abs=1e-6)


def test_weighted_values_are_clipped_before_weighting() -> None:
    vectors = [np.array([5.0, -5.0, 0.5]), np.array([2.0, 0.25, -3.0]), np.array([0.0, 0.0, 0.0])]
    weights = [2.0, 0.5, 1.0]
    result = secure_sum(vectors, SecAggConfig(max_weight=2.0), weights=weights, seed="wclip", workers=1)
    expected = 2.0 * np.array([1.0, -1.0, 0.5]) + 0.5 * np.array([1.0, 0.25, -1.0])
    assert np.abs(result.total - expected).max() <= 3 / result.config.scale + 1e-12


def test_mean_of_all_zero_weights_is_an_error() -> None:
    result = secure_sum(_vectors(3, 4, 15), weights=[0.0, 0.0, 0.0], seed="zero", workers=1)
    assert result.total_weight == 0.0
    assert np.all(result.total == 0.0)
    with pytest.raises(ConfigError):
        _ = result.mean


# ------------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("clip", [1.0, 2.5, 0.125])
def test_values_beyond_clip_are_clipped(clip: float) -> None:
    rng = np.random.default_rng(16)
    vectors = rng.uniform(-4 * clip, 4 * clip, size=(5, 40))
    vectors[0, :3] = [1e6, -1e6, clip]  # far outside, and exactly on the edge
    result = secure_sum(vectors, SecAggConfig(clip=clip), seed=f"clip-{clip}", workers=1)
    assert result.config.clip == clip
    clipped = np.clip(vectors, -clip, clip)
    _assert_within_quantisation(result, clipped, 5)
    # ... and it is far from the unclipped sum, so the clip really happened.
    assert np.abs(result.total - vectors.sum(axis=0)).max() > 1.0


# ------------------------------------------------------------------------------- determinism
def test_same_seed_same_round_different_seed_different_bytes() -> None:
    vectors = _vectors(5, 10, 17)
    a = secure_sum(vectors, seed="det", workers=1)
    b = secure_sum(vectors, seed="det", workers=1)
    c = secure_sum(vectors, seed="other", workers=1)
    np.testing.assert_array_equal(a.total, b.total)
    assert a.config == b.config and a.config.digest == b.config.digest
    assert [m.data for m in a.coordinator_view.messages] == [m.data for m in b.coordinator_view.messages]
    assert a.config.digest != c.config.digest  # another roster and graph seed
    a_msgs = {(m.stage, m.sender): m.data for m in a.coordinator_view.messages}
    c_msgs = {(m.stage, m.sender): m.data for m in c.coordinator_view.messages}
    assert a_msgs.keys() == c_msgs.keys()
    assert all(a_msgs[k] != c_msgs[k] for k in a_msgs)
    # Both still compute the same sum, up to quantisation.
    assert np.abs(a.total - c.total).max() <= 2 * 5 / a.config.scale


def test_unseeded_rounds_differ() -> None:
    vectors = _vectors(3, 4, 18)
    a = secure_sum(vectors, workers=1)
    b = secure_sum(vectors, workers=1)
    masked = lambda r: [m.data for m in r.coordinator_view.messages if m.stage is Stage.MASKED_INPUT]  # noqa: E731
    assert masked(a) != masked(b)


# ------------------------------------------------------------------------------- the view
def test_view_stages_and_upload_sizes_at_32_bits() -> None:
    n, length = 6, 50
    result = secure_sum(_vectors(n, length, 19), seed="bytes", workers=1)
    view = result.coordinator_view
    per_stage = view.bytes_per_stage
    assert set(per_stage) == set(STAGE_NAMES)
    assert all(per_stage[name] > 0 for name in STAGE_NAMES)
    assert view.total_bytes == sum(per_stage.values()) == sum(m.nbytes for m in view.messages)
    for site in range(n):
        up = view.upload_bytes(site)
        assert up == view.upload_bytes(site, "masked_input") == view.upload_bytes(site, Stage.MASKED_INPUT)
        assert 4 * length <= up <= 4 * length + 4 + HEADER_ALLOWANCE  # values, the weight slot, framing
    assert sum(view.upload_bytes(s) for s in range(n)) == per_stage["masked_input"]
    # Each site sends exactly one message per stage, and the sizes add up.
    for stage in Stage:
        senders = [m.sender for m in view.messages if m.stage is stage]
        assert sorted(senders) == list(range(n))
        assert sum(view.upload_bytes(s, stage) for s in range(n)) == per_stage[stage.value]


def test_upload_grows_four_bytes_per_parameter_at_32_bits_and_eight_at_64() -> None:
    sizes = {}
    for bit_width in (32, 64):
        for length in (5, 45):
            r = secure_sum(_vectors(3, length, 20), SecAggConfig(bit_width=bit_width), seed="grow", workers=1)
            sizes[bit_width, length] = r.coordinator_view.upload_bytes(1)
    assert sizes[32, 45] - sizes[32, 5] == 4 * 40
    assert sizes[64, 45] - sizes[64, 5] == 8 * 40


def test_view_without_payloads_keeps_byte_counts() -> None:
    vectors = _vectors(4, 6, 21)
    kept = secure_sum(vectors, seed="keep", workers=1)
    dropped = secure_sum(vectors, seed="keep", workers=1, keep_messages=False)
    assert all(m.data is None for m in dropped.coordinator_view.messages)
    assert all(m.data is not None and len(m.data) == m.nbytes for m in kept.coordinator_view.messages)
    assert dropped.coordinator_view.bytes_per_stage == kept.coordinator_view.bytes_per_stage
    np.testing.assert_array_equal(dropped.total, kept.total)


def _grid_vectors(n: int, length: int, seed: int) -> np.ndarray:
    """Distinct non-zero multiples of 2**-12: exactly representable at any scale >= 2**12,
    so the fixed-point encoding involves no random rounding and can be recomputed exactly."""
    rng = np.random.default_rng(seed)
    ints = rng.choice(np.arange(1, 4000), size=(n, length), replace=True) * rng.choice([-1, 1], size=(n, length))
    return ints / 4096.0


@pytest.mark.parametrize("neighbors", [None, 4])
@pytest.mark.parametrize("bit_width", [32, 64])
def test_coordinator_never_sees_a_plaintext_vector(bit_width: int, neighbors) -> None:
    n, length = 8, 24
    vectors = _grid_vectors(n, length, 22 + bit_width)
    result = secure_sum(vectors, SecAggConfig(bit_width=bit_width, neighbors=neighbors), seed="privacy", workers=1)
    config = result.config
    assert config.scale >= 2**12
    haystack = b"".join(m.data for m in result.coordinator_view.messages)
    needles = {}
    for i, v in enumerate(vectors):
        encoded = encode_input(config, v, 1.0, SeededRandom(f"unused-{i}"))
        again = encode_input(config, v, 1.0, SeededRandom(f"other-{i}"))
        np.testing.assert_array_equal(encoded, again)  # no random rounding on this grid
        needles[f"float64 {i}"] = v.astype("<f8").tobytes()
        needles[f"float32 {i}"] = v.astype("<f4").tobytes()
        needles[f"encoded {i}"] = encoded.astype(encoded.dtype.newbyteorder("<")).tobytes()
        needles[f"encoded values {i}"] = encoded[:-1].astype(encoded.dtype.newbyteorder("<")).tobytes()
    for label, needle in needles.items():
        assert not contains_window(haystack, needle, 16), f"the coordinator saw {label}"
    # Control: the same search does find an unmasked encoding when one is sent.
    leaked = MaskedInput(round_id=1, config_digest=config.digest, sender=0,
                         values=encode_input(config, vectors[3], 1.0, SeededRandom("x"))).encode()
    assert contains_window(haystack + leaked, needles["encoded 3"], 16)
    assert result.total == pytest.approx(vectors.sum(axis=0), abs=n / config.scale + 1e-12)


def _masked_uploads(result) -> np.ndarray:
    uploads = [decode_message(m.data).values for m in result.coordinator_view.messages if m.stage is Stage.MASKED_INPUT]
    return np.stack(uploads)


@pytest.mark.parametrize("bit_width", [32, 64])
def test_masked_uploads_look_uniformly_random(bit_width: int) -> None:
    n, length = 10, 50
    # Small, structured inputs: unmasked, their high bits would be all zeros or all ones.
    vectors = np.tile(np.linspace(-0.01, 0.01, length), (n, 1))
    result = secure_sum(vectors, SecAggConfig(bit_width=bit_width), seed=f"uniform-{bit_width}", workers=1)
    uploads = _masked_uploads(result)
    assert uploads.shape == (n, length + 1)
    _assert_uniform_bits(uploads, bit_width)
    # Control: the same statistics reject the unmasked encodings.
    plain = np.stack([encode_input(result.config, v, 1.0, SeededRandom("control")) for v in vectors])
    with pytest.raises(AssertionError):
        _assert_uniform_bits(plain, bit_width)


def _assert_uniform_bits(words: np.ndarray, bit_width: int) -> None:
    words = words.astype(np.uint64 if bit_width == 64 else np.uint32).reshape(-1)
    count = words.size
    bits = np.array([(words >> np.uint64(b)) & 1 for b in range(bit_width)], dtype=np.float64)  # bit x word
    ones_per_bit = bits.sum(axis=1)
    # Chi-square over bit positions: each position is one with probability 1/2.
    chi2 = float(np.sum((ones_per_bit - count / 2) ** 2 / (count / 4)))
    # 99.9999th percentile of chi-square with 32 / 64 degrees of freedom is below 3 * dof.
    assert chi2 < 3 * bit_width, f"bit-position chi-square {chi2:.1f} for {bit_width} degrees of freedom"
    total = bits.sum()
    z = (total - bits.size / 2) / math.sqrt(bits.size / 4)
    assert abs(z) < 5, f"overall fraction of one bits is off (z = {z:.2f})"
    # Bytes: chi-square over the 256 byte values.
    as_bytes = np.frombuffer(words.astype(words.dtype.newbyteorder("<")).tobytes(), dtype=np.uint8)
    hist = np.bincount(as_bytes, minlength=256)
    expected = as_bytes.size / 256
    byte_chi2 = float(np.sum((hist - expected) ** 2 / expected))
    assert byte_chi2 < 400, f"byte chi-square {byte_chi2:.1f} for 255 degrees of freedom"


def test_the_garbage_collector_is_restored_after_a_round() -> None:
    import gc

    assert gc.isenabled()
    secure_sum(_vectors(4, 5, 3), seed=1, workers=1)
    assert gc.isenabled()
    gc.disable()
    try:
        secure_sum(_vectors(4, 5, 3), seed=1, workers=1)
        assert not gc.isenabled()  # a caller's own choice is left alone
    finally:
        gc.enable()
