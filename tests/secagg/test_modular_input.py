"""Inputs already encoded in Z_(2^b) are summed exactly, modulo 2^b, through the full protocol."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.errors import ConfigError, ProtocolAbort
from securefed.secagg import ModularInput, SecAggConfig, secure_modular_sum


@pytest.mark.parametrize("bit_width, dtype", [(32, np.uint32), (64, np.uint64)])
def test_modular_sum_wraps_exactly(bit_width: int, dtype: type) -> None:
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    rows = rng.integers(0, info.max, size=(5, 300), dtype=dtype, endpoint=True)
    result = secure_modular_sum(rows, SecAggConfig(bit_width=bit_width), seed=3)
    expected = np.zeros(300, dtype=dtype)
    for row in rows:
        expected += row  # numpy unsigned addition wraps modulo 2^b: the independent oracle
    assert result.total.dtype == dtype
    np.testing.assert_array_equal(result.total, expected)
    assert result.survivors == set(range(5))


def test_modular_sum_with_dropouts_sums_the_survivors_only() -> None:
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 2**32, size=(6, 50), dtype=np.uint32)
    result = secure_modular_sum(rows, SecAggConfig(), dropouts={"masked_input": [1], "unmask": [4]}, seed=0)
    assert result.survivors == {0, 2, 3, 4, 5}
    np.testing.assert_array_equal(result.total, rows[[0, 2, 3, 4, 5]].sum(axis=0, dtype=np.uint32))


def test_coordinator_sees_no_encoded_input() -> None:
    rows = np.arange(4 * 64, dtype=np.uint32).reshape(4, 64)
    result = secure_modular_sum(rows, SecAggConfig(), seed=5)
    for message in result.coordinator_view.messages:
        for row in rows:
            assert row.tobytes()[:64] not in message.data


def test_wrong_ring_is_refused_with_the_fix() -> None:
    rows = np.zeros((3, 10), dtype=np.uint64)
    with pytest.raises(ConfigError, match="32-bit ring needs uint32"):
        secure_modular_sum(rows, SecAggConfig(bit_width=32))
    with pytest.raises(ConfigError, match="uint32"):
        ModularInput(np.zeros(4, dtype=np.int32))
    with pytest.raises(ConfigError, match="at least 2 rows"):
        secure_modular_sum(rows[:1], SecAggConfig(bit_width=64))


def test_too_many_dropouts_still_abort() -> None:
    rows = np.zeros((4, 8), dtype=np.uint32)
    with pytest.raises(ProtocolAbort):
        secure_modular_sum(rows, SecAggConfig(), dropouts={"masked_input": [0, 1, 2]}, seed=1)
