"""The embedded tasks: shapes, dtypes, determinism, disjoint splits, train-only standardisation."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.data import DataConfig, FederatedTask, TaskKind, load_task

SITES = ["st-thomas", "guys", "kings"]


def _rows(task: FederatedTask) -> list[bytes]:
    """One byte string per sample, over every site split and the test set."""
    splits = [s.train for s in task.sites] + [s.val for s in task.sites] + [task.test]
    return [row.tobytes() for split in splits for row in split.inputs]


def _same(a: FederatedTask, b: FederatedTask) -> bool:
    pairs = [(x.train, y.train) for x, y in zip(a.sites, b.sites)] + [(x.val, y.val) for x, y in zip(a.sites, b.sites)]
    pairs.append((a.test, b.test))
    return all(np.array_equal(x.inputs, y.inputs) and np.array_equal(x.targets, y.targets) for x, y in pairs)


def test_breast_cancer_shapes_and_disjoint_splits() -> None:
    task = load_task(DataConfig(kind="breast-cancer"), sites=SITES, seed=3)
    assert task.name == "breast-cancer" and "breast" in task.description
    assert task.spec.kind is TaskKind.CLASSIFICATION
    assert (task.spec.input_shape, task.spec.spatial_dims, task.spec.num_classes) == ((30,), 0, 2)
    assert [s.name for s in task.sites] == SITES
    for split in [task.test] + [s.train for s in task.sites] + [s.val for s in task.sites]:
        assert split.inputs.dtype == np.float32 and split.targets.dtype == np.int64
        assert split.inputs.shape[1:] == (30,) and split.targets.shape == (len(split),)
        assert set(np.unique(split.targets)) <= {0, 1}
    rows = _rows(task)
    assert len(rows) == 569 and len(set(rows)) == 569  # every sample exactly once
    assert len(task.test) == round(0.2 * 569)
    for site in task.sites:
        assert len(site.val) == round(0.2 * (len(site.train) + len(site.val)))
    # the test set is stratified: its malignant share is the data's (212 / 569)
    assert abs(np.mean(task.test.targets == 0) - 212 / 569) < 0.01


def test_breast_cancer_is_standardised_with_training_statistics_only() -> None:
    task = load_task(DataConfig(kind="breast-cancer"), sites=SITES, seed=0)
    train = np.concatenate([s.train.inputs for s in task.sites]).astype(np.float64)
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=0), 1, atol=1e-4)
    held_out = np.concatenate([task.test.inputs] + [s.val.inputs for s in task.sites]).astype(np.float64)
    # held-out rows went through the same transform but did not set it
    assert np.abs(held_out.mean(axis=0)).max() > 1e-3


def test_breast_cancer_deterministic_given_seed() -> None:
    config = DataConfig(kind="breast-cancer", split="dirichlet", alpha=0.3)
    first = load_task(config, sites=SITES, seed=11)
    assert _same(first, load_task(config, sites=SITES, seed=11))
    assert not _same(first, load_task(config, sites=SITES, seed=12))


@pytest.mark.parametrize("kind, shape", [("synthetic-seg2d", (1, 64, 64)), ("synthetic-seg3d", (1, 32, 32, 32))])
def test_synthetic_defaults(kind: str, shape: tuple[int, ...]) -> None:
    task = load_task(DataConfig(kind=kind), sites=["a", "b"], seed=0)
    spec = task.spec
    assert spec.kind is TaskKind.SEGMENTATION and spec.num_classes == 2
    assert spec.input_shape == shape and spec.spatial_dims == len(shape) - 1
    total = len(task.test) + sum(len(s.train) + len(s.val) for s in task.sites)
    assert total == (160 if kind.endswith("2d") else 48)
    for split in [task.test] + [s.train for s in task.sites]:
        assert split.inputs.dtype == np.float32 and split.inputs.shape[1:] == shape
        assert split.targets.dtype == np.int64 and split.targets.shape == split.inputs.shape
        assert set(np.unique(split.targets)) == {0, 1}
        assert split.inputs.min() >= 0 and split.inputs.max() <= 1
    # foreground is brighter than background: the task is learnable
    inputs, targets = task.test.inputs, task.test.targets
    assert inputs[targets == 1].mean() > inputs[targets == 0].mean() + 0.3
    assert 0.03 < targets.mean() < 0.5
    rows = _rows(task)
    assert len(set(rows)) == len(rows) == total


def test_synthetic_overrides_and_determinism() -> None:
    config = DataConfig(kind="synthetic-seg2d", samples=20, image_size=24)
    first = load_task(config, sites=["a", "b"], seed=5)
    assert first.spec.input_shape == (1, 24, 24)
    assert len(first.test) + sum(len(s.train) + len(s.val) for s in first.sites) == 20
    assert _same(first, load_task(config, sites=["a", "b"], seed=5))
    other = load_task(config, sites=["a", "b"], seed=6)
    assert not np.array_equal(first.test.inputs, other.test.inputs)
    volumes = load_task(DataConfig(kind="synthetic-seg3d", samples=12, image_size=16), sites=["a"], seed=0)
    assert volumes.spec.input_shape == (1, 16, 16, 16) and volumes.test.targets.shape[1:] == (1, 16, 16, 16)


def test_subset_copies_and_checks_alignment() -> None:
    task = load_task(DataConfig(kind="breast-cancer"), sites=["a"], seed=0)
    part = task.test.subset([2, 0])
    assert len(part) == 2 and np.array_equal(part.inputs[1], task.test.inputs[0])
    from securefed.data import ArrayDataset

    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        ArrayDataset(inputs=np.zeros((3, 2)), targets=np.zeros(2))
