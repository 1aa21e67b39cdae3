"""The splitters, at the level of sample indices: sizes, disjointness, skew, minimums, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.data import SplitKind
from securefed.data.splitters import (
    MIN_PER_SPLIT,
    MIN_SITE_SAMPLES,
    partition,
    samples_needed,
    split_dirichlet,
    split_iid,
    stratified_holdout,
)
from securefed.errors import ConfigError


def _labels(n: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _skew(parts: list[np.ndarray], labels: np.ndarray, classes: int) -> float:
    """Mean total-variation distance between each site's label mix and the overall mix."""
    overall = np.bincount(labels, minlength=classes) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - overall).sum()
                          for p in parts]))


def _assert_partitions(parts: list[np.ndarray], universe: np.ndarray) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a sample is in two parts"
    assert np.array_equal(np.sort(joined), np.sort(universe)), "samples lost or invented"


def test_iid_near_equal_and_disjoint() -> None:
    parts = split_iid(np.arange(103), 5, np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [20, 20, 21, 21, 21]
    _assert_partitions(parts, np.arange(103))
    again = split_iid(np.arange(103), 5, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_small_alpha_skews_more_than_large_alpha() -> None:
    labels = _labels(2000, 5)
    idx = np.arange(2000)
    skewed = [_skew(split_dirichlet(idx, labels, 8, 0.1, np.random.default_rng(s)), labels, 5) for s in range(3)]
    mixed = [_skew(split_dirichlet(idx, labels, 8, 100.0, np.random.default_rng(s)), labels, 5) for s in range(3)]
    assert min(skewed) > 0.4 and max(mixed) < 0.1, (skewed, mixed)
    for alpha in (0.1, 100.0):
        parts = split_dirichlet(idx, labels, 8, alpha, np.random.default_rng(1))
        _assert_partitions(parts, idx)
        assert min(len(p) for p in parts) >= MIN_SITE_SAMPLES


def test_dirichlet_tops_up_sites_when_every_draw_leaves_one_short() -> None:
    # 40 samples among 10 sites with extreme skew: redraws essentially never give every site 4
    labels = _labels(40, 2)
    parts = split_dirichlet(np.arange(40), labels, 10, 0.001, np.random.default_rng(0))
    assert [len(p) for p in parts] == [MIN_SITE_SAMPLES] * 10
    _assert_partitions(parts, np.arange(40))
    again = split_dirichlet(np.arange(40), labels, 10, 0.001, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_stratified_holdout_keeps_class_proportions() -> None:
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    rest, held = stratified_holdout(np.arange(100), labels, 30, np.random.default_rng(0))
    assert np.bincount(labels[held]).tolist() == [21, 6, 3]
    _assert_partitions([rest, held], np.arange(100))


@pytest.mark.parametrize("split", [SplitKind.IID, SplitKind.DIRICHLET])
def test_partition_covers_every_sample_once(split: SplitKind) -> None:
    labels = _labels(300, 3)
    parts = partition(size=300, labels=labels, split=split, num_sites=4, alpha=0.5, val_fraction=0.25,
                      test_fraction=0.2, rng=np.random.default_rng(7))
    assert len(parts.test) == 60
    pieces = [parts.test] + [p for site in parts.sites for p in site]
    _assert_partitions(pieces, np.arange(300))
    for train, val in parts.sites:
        assert len(train) >= MIN_PER_SPLIT and len(val) >= MIN_PER_SPLIT
        assert abs(len(val) - 0.25 * (len(train) + len(val))) <= 1


def test_partition_by_groups_takes_test_from_each_group() -> None:
    groups = (("a", np.arange(0, 30)), ("b", np.arange(30, 50)))
    parts = partition(size=50, labels=np.zeros(50, dtype=np.int64), split=SplitKind.BY_FOLDER, num_sites=2,
                      alpha=1.0, val_fraction=0.2, test_fraction=0.2, rng=np.random.default_rng(0), groups=groups)
    assert np.sum(parts.test < 30) == 6 and np.sum(parts.test >= 30) == 4
    for (_, members), (train, val) in zip(groups, parts.sites):
        assert set(train) | set(val) <= set(members)
    _assert_partitions([parts.test] + [p for site in parts.sites for p in site], np.arange(50))


def test_partition_refuses_too_few_samples_and_says_how_many() -> None:
    need = samples_needed(5, 0.2)
    with pytest.raises(ConfigError) as info:
        partition(size=need - 1, labels=None, split=SplitKind.IID, num_sites=5, alpha=1.0,
                  val_fraction=0.2, test_fraction=0.2, rng=np.random.default_rng(0), what="'demo'")
    message = str(info.value)
    assert f"has {need - 1} samples" in message and f"need at least {need}" in message
    assert "use at most 4 sites" in message
    # exactly enough works and leaves every site its minimum
    parts = partition(size=need, labels=None, split=SplitKind.IID, num_sites=5, alpha=1.0,
                      val_fraction=0.2, test_fraction=0.2, rng=np.random.default_rng(0))
    assert all(len(t) >= MIN_PER_SPLIT and len(v) >= MIN_PER_SPLIT for t, v in parts.sites)


def test_partition_dirichlet_without_labels_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="use split 'iid'"):
        partition(size=40, labels=None, split=SplitKind.DIRICHLET, num_sites=2, alpha=1.0,
                  val_fraction=0.2, test_fraction=0.2, rng=np.random.default_rng(0))
