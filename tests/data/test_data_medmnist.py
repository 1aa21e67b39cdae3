"""MedMNIST-format .npz files written here with numpy: layouts, labels, resizing and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from securefed.data import DataConfig, TaskKind, data_problems, load_task
from securefed.data.resize import resize_linear
from securefed.errors import ConfigError

COUNTS = {"train": 40, "val": 10, "test": 12}


def _write(path: Path, *, shape: tuple[int, ...] = (28, 28), classes: int = 3, column: bool = False,
           drop: tuple[str, ...] = (), **override: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in COUNTS.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        labels = np.arange(n) % classes
        arrays[f"{split}_labels"] = labels[:, None] if column else labels
    arrays.update(override)
    for key in drop:
        del arrays[key]
    np.savez(path, **arrays)
    return path


def _config(path: Path, **kw: object) -> DataConfig:
    return DataConfig(kind="medmnist", path=path, **kw)


def test_grey_28x28_with_nx1_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "grey.npz", column=True)
    task = load_task(_config(path), sites=["a", "b"], seed=0)
    spec = task.spec
    assert spec.kind is TaskKind.CLASSIFICATION and spec.input_shape == (1, 28, 28)
    assert spec.spatial_dims == 2 and spec.num_classes == 3
    # MedMNIST's own test split is the global test set; train+val is what the sites share
    assert len(task.test) == COUNTS["test"]
    assert sum(len(s.train) + len(s.val) for s in task.sites) == COUNTS["train"] + COUNTS["val"]
    raw = np.load(path)
    np.testing.assert_allclose(task.test.inputs[:, 0], raw["test_images"] / 255.0, atol=1e-6)
    assert np.array_equal(task.test.targets, raw["test_labels"][:, 0])
    assert task.test.inputs.dtype == np.float32 and task.test.targets.dtype == np.int64
    pooled = np.concatenate([raw["train_images"], raw["val_images"]]).reshape(50, -1)
    site_rows = np.concatenate([np.concatenate([s.train.inputs, s.val.inputs]) for s in task.sites])
    found = {(np.round(r * 255).astype(np.uint8)).tobytes() for r in site_rows.reshape(50, -1)}
    assert found == {r.tobytes() for r in pooled}  # every pooled image at exactly one site


def test_rgb_resized_and_deterministic(tmp_path: Path) -> None:
    path = _write(tmp_path / "rgb.npz", shape=(28, 28, 3))
    config = _config(path, image_size=16, split="dirichlet", alpha=1.0)
    task = load_task(config, sites=["a", "b"], seed=4)
    assert task.spec.input_shape == (3, 16, 16)
    assert task.test.inputs.min() >= 0 and task.test.inputs.max() <= 1
    again = load_task(config, sites=["a", "b"], seed=4)
    for x, y in zip(task.sites, again.sites):
        assert np.array_equal(x.train.inputs, y.train.inputs) and np.array_equal(x.val.targets, y.val.targets)


def test_resize_keeps_a_constant_image_constant(tmp_path: Path) -> None:
    images = {f"{s}_images": np.full((n, 8, 8), 128, dtype=np.uint8) for s, n in COUNTS.items()}
    task = load_task(_config(_write(tmp_path / "flat.npz", **images), image_size=4), sites=["a"], seed=0)
    np.testing.assert_allclose(task.test.inputs, 128 / 255, atol=1e-6)


def test_volumes_are_3d(tmp_path: Path) -> None:
    path = _write(tmp_path / "vol.npz", shape=(8, 8, 8))
    task = load_task(_config(path), sites=["a"], seed=0)
    assert task.spec.input_shape == (1, 8, 8, 8) and task.spec.spatial_dims == 3


def test_missing_keys_are_listed_with_those_found(tmp_path: Path) -> None:
    path = _write(tmp_path / "partial.npz", drop=("val_images", "test_labels"))
    with pytest.raises(ConfigError) as info:
        load_task(_config(path), sites=["a"], seed=0)
    message = str(info.value)
    assert "'test_labels'" in message and "'val_images'" in message and "train_images" in message
    assert data_problems(_config(path), sites=["a"])  # seen without loading too


def test_not_an_npz_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    assert "not a readable .npz" in " ".join(data_problems(_config(bad), sites=["a"]))
    missing = data_problems(_config(tmp_path / "nowhere.npz"), sites=["a"])
    assert any("does not exist" in p and "nowhere.npz" in p for p in missing)
    folder = data_problems(_config(tmp_path), sites=["a"])
    assert any("is a folder" in p and "image-folder" in p for p in folder)


def test_bad_labels_report_every_problem(tmp_path: Path) -> None:
    path = _write(tmp_path / "labels.npz",
                  train_labels=np.zeros((40, 14), dtype=np.uint8),  # multi-label, ChestMNIST-style
                  val_labels=np.zeros(9, dtype=np.int64),           # one short
                  test_labels=-np.ones(12, dtype=np.int64))         # negative
    with pytest.raises(ConfigError) as info:
        load_task(_config(path), sites=["a"], seed=0)
    problems = info.value.problems
    assert len(problems) == 3
    text = " ".join(problems)
    assert "14 columns" in text and "single-label" in text
    assert "10 images but val_labels has 9" in text
    assert "non-negative integers" in text


def test_single_class_and_different_sizes(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.npz", classes=1)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        load_task(_config(path), sites=["a"], seed=0)
    sizes = _write(tmp_path / "sizes.npz", test_images=np.zeros((12, 32, 32), dtype=np.uint8))
    with pytest.raises(ConfigError, match="set data.image_size"):
        load_task(_config(sizes), sites=["a"], seed=0)
    assert load_task(_config(sizes, image_size=28), sites=["a"], seed=0).test.inputs.shape == (12, 1, 28, 28)


def test_too_few_images_for_the_sites(tmp_path: Path) -> None:
    path = _write(tmp_path / "small.npz")
    with pytest.raises(ConfigError, match=r"has 50 samples, but 13 sites need at least 52.*at most 12 sites"):
        load_task(_config(path), sites=[f"s{i}" for i in range(13)], seed=0)


def test_resize_linear_interpolates_between_pixel_centres() -> None:
    row = np.array([[[0.0, 1.0, 2.0, 3.0]]])  # (C=1, H=1, W=4)
    np.testing.assert_allclose(resize_linear(row, 2, spatial_dims=1)[0, 0], [0.5, 2.5])
    np.testing.assert_allclose(resize_linear(np.array([[0.0, 4.0]]), 4, spatial_dims=1)[0], [0, 1, 3, 4])
