"""Tests for securefed.primitives.prg (the AES-256-CTR mask PRG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.errors import ConfigError, CryptoError
from securefed.primitives import prg
from securefed.primitives.prg import SEED_SIZE, MaskAccumulator, expand, expand_into

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "prg_aes256ctr.json").read_text())


def _ecb_keystream(key: bytes, first_counter: int, n_bytes: int) -> bytes:
    """Independent CTR keystream: AES-ECB of explicit big-endian counter blocks."""
    blocks = b"".join(
        ((first_counter + i) % 2**128).to_bytes(16, "big") for i in range(-(-n_bytes // 16))
    )
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(blocks)[:n_bytes]


def _words_from_bytes(data: bytes, dtype: str) -> list[int]:
    size = 4 if dtype == "uint32" else 8
    return [int.from_bytes(data[i : i + size], "little") for i in range(0, len(data), size)]


@pytest.mark.parametrize("case", VECTORS["nist_ctr"], ids=lambda c: c["name"])
def test_nist_sp800_38a_ctr_aes256(case: dict) -> None:
    key = bytes.fromhex(case["key"])
    counter = bytes.fromhex(case["initial_counter"])
    plaintext = bytes.fromhex(case["plaintext"])
    keystream = np.empty(len(plaintext) // 4, dtype=np.uint32)
    expand_into(key, keystream, initial_counter=counter)
    raw = keystream.astype("<u4").tobytes()
    assert bytes(a ^ b for a, b in zip(raw, plaintext)).hex() == case["ciphertext"]
    assert raw == _ecb_keystream(key, int.from_bytes(counter, "big"), len(plaintext))


@pytest.mark.parametrize("case", VECTORS["masks"], ids=lambda c: c["name"])
def test_mask_known_answers(case: dict) -> None:
    seed = bytes.fromhex(case["seed"])
    dtype = np.dtype(case["dtype"])
    words = expand(seed, len(case["words"]), dtype.type)
    assert words.dtype == dtype
    assert words.tolist() == case["words"]
    independent = _ecb_keystream(seed, 0, len(case["words"]) * dtype.itemsize)
    assert _words_from_bytes(independent, case["dtype"]) == case["words"]


def test_expand_into_crosses_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Shrink the chunk so a small array spans several chunks and ends in a partial one.
    monkeypatch.setattr(prg, "_CHUNK_BYTES", 64)
    prg._zeros.cache_clear()
    try:
        seed = bytes(range(1, 33))
        out = np.empty(37, dtype=np.uint32)
        expand_into(seed, out)
        assert out.tolist() == _words_from_bytes(_ecb_keystream(seed, 0, 37 * 4), "uint32")
        acc = MaskAccumulator(37, np.uint64)
        acc.add(seed)
        assert acc.values.tolist() == _words_from_bytes(_ecb_keystream(seed, 0, 37 * 8), "uint64")
    finally:
        prg._zeros.cache_clear()


def test_expand_prefix_consistency_and_two_dimensional_output() -> None:
    seed = bytes(32)
    long = expand(seed, 1000, np.uint64)
    assert np.array_equal(expand(seed, 10, np.uint64), long[:10])
    grid = np.empty((10, 100), dtype=np.uint64)
    expand_into(seed, grid)
    assert np.array_equal(grid.ravel(), long)
    # uint64 words are pairs of uint32 words, low word first.
    as32 = expand(seed, 2000, np.uint32).astype(np.uint64)
    assert np.array_equal(as32[0::2] | (as32[1::2] << np.uint64(32)), long)


def test_expand_rejects_bad_input() -> None:
    for bad_seed in (b"", bytes(31), bytes(33), "x" * 32):
        with pytest.raises(CryptoError):
            expand(bad_seed, 4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        expand_into(bytes(32), np.empty(4, dtype=np.int32))
    with pytest.raises(ConfigError):
        expand_into(bytes(32), np.empty(8, dtype=np.uint32)[::2])
    with pytest.raises(ConfigError):
        expand(bytes(32), 4, np.float64)  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        expand_into(bytes(32), np.empty(4, dtype=np.uint32), initial_counter=bytes(15))


def test_expand_zero_length() -> None:
    assert expand(bytes(32), 0).size == 0


@settings(max_examples=30, deadline=None)
@given(
    length=st.integers(min_value=0, max_value=3000),
    use_64=st.booleans(),
    seeds=st.lists(st.binary(min_size=SEED_SIZE, max_size=SEED_SIZE), min_size=1, max_size=4),
    data=st.data(),
)
def test_mask_add_then_subtract_is_identity(
    length: int, use_64: bool, seeds: list[bytes], data: st.DataObject
) -> None:
    dtype = np.uint64 if use_64 else np.uint32
    bits = 64 if use_64 else 32
    start = np.array(
        data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=length, max_size=length)),
        dtype=dtype,
    )
    acc = MaskAccumulator(length, dtype)
    acc.add_array(start)
    for seed in seeds:
        acc.add(seed)
    if length and len(set(seeds)) == len(seeds):
        assert not np.array_equal(acc.values, start)
    for seed in reversed(seeds):
        acc.subtract(seed)
    assert np.array_equal(acc.values, start)


def test_accumulator_is_sum_mod_2_to_the_bits() -> None:
    seeds = [bytes([i]) * 32 for i in range(3)]
    acc = MaskAccumulator(500, np.uint32)
    for seed in seeds:
        acc.add(seed)
    acc.subtract(bytes([9]) * 32)
    expected = sum(int_words(s) for s in seeds) - int_words(bytes([9]) * 32)
    assert acc.values.astype(object).tolist() == [int(v) % 2**32 for v in expected]


def int_words(seed: bytes) -> np.ndarray:
    return expand(seed, 500, np.uint32).astype(object)


def test_accumulator_validation_and_memory() -> None:
    acc = MaskAccumulator(10, np.uint32)
    with pytest.raises(ConfigError):
        acc.add_array(np.zeros(11, dtype=np.uint32))
    with pytest.raises(ConfigError):
        acc.add_array(np.zeros(10, dtype=np.uint64))
    with pytest.raises(CryptoError):
        acc.add(bytes(16))
    with pytest.raises(ConfigError):
        MaskAccumulator(10, np.int64)  # type: ignore[arg-type]
    big = MaskAccumulator(1 << 22, np.uint32)
    # The scratch buffer is bounded by the chunk size, not the vector length.
    assert big._scratch.nbytes <= prg._CHUNK_BYTES < big.values.nbytes


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("length", [1, 7, 8, 16, 40, 41])
def test_accumulator_whole_and_partial_chunks(
    monkeypatch: pytest.MonkeyPatch, dtype: type, length: int
) -> None:
    # 64-byte chunks: 16 or 8 words, so the lengths cover whole chunks, a partial last chunk
    # and a single partial chunk.
    monkeypatch.setattr(prg, "_CHUNK_BYTES", 64)
    prg._zeros.cache_clear()
    try:
        seeds = [bytes([i + 1]) * 32 for i in range(3)]
        acc = MaskAccumulator(length, dtype)
        acc.add(seeds[0])
        acc.add(seeds[1])
        acc.subtract(seeds[2])
        bits = 8 * np.dtype(dtype).itemsize
        size = np.dtype(dtype).itemsize
        streams = [
            _words_from_bytes(_ecb_keystream(seed, 0, length * size), str(np.dtype(dtype)))
            for seed in seeds
        ]
        expected = [(a + b - c) % 2**bits for a, b, c in zip(*streams)]
        assert acc.values.tolist() == expected
        # An accumulator made before the chunk size shrank still folds whole masks.
        monkeypatch.setattr(prg, "_CHUNK_BYTES", 16)
        prg._zeros.cache_clear()
        acc.subtract(seeds[0])
        acc.subtract(seeds[1])
        acc.add(seeds[2])
        assert not acc.values.any()
    finally:
        prg._zeros.cache_clear()
