"""DataConfig validation, the cheap pre-load checks, and the package's import footprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import securefed.data as data
from securefed.data import DataConfig, DataKind, SplitKind, data_problems, folder_site_names, load_task
from securefed.errors import ConfigError


def test_strings_become_enums_and_paths(tmp_path: Path) -> None:
    config = DataConfig(kind="Image_Folder", path=str(tmp_path), split="BY-FOLDER", labels_csv="")
    assert config.kind is DataKind.IMAGE_FOLDER and config.split is SplitKind.BY_FOLDER
    assert config.path == tmp_path and config.labels_csv is None
    assert DataConfig().kind is DataKind.BREAST_CANCER and DataConfig().split is SplitKind.IID


def test_every_field_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig(kind="breast-cancer", path="x.npz", alpha=0, val_fraction=1.0, test_fraction=-0.1,
                   samples=10, image_size=32, labels_csv="l.csv")
    text = " | ".join(info.value.problems)
    assert len(info.value.problems) == 7
    assert "data.alpha must be a finite number > 0" in text and "got 0" in text
    assert "data.val_fraction must be a number strictly between 0 and 1" in text and "got 1.0" in text
    assert "data.test_fraction" in text and "got -0.1" in text
    assert "kind 'breast-cancer' is embedded and reads no files" in text
    assert "data.samples applies only to the synthetic kinds" in text
    assert "image_size does not apply to 'breast-cancer'" in text
    assert "labels_csv applies only to kind 'image-folder'" in text


@pytest.mark.parametrize("kwargs, expected", [
    ({"kind": "mnist"}, "data.kind must be one of ['breast-cancer', 'synthetic-seg2d'"),
    ({"split": "random"}, "data.split must be one of ['iid', 'dirichlet', 'by-folder'], got 'random'"),
    ({"kind": "medmnist"}, "data.path is required for kind 'medmnist': set it to the MedMNIST .npz file"),
    ({"kind": "image-folder"}, "data.path is required for kind 'image-folder'"),
    ({"split": "by-folder"}, "'by-folder' needs kind 'image-folder'"),
    ({"kind": "synthetic-seg2d", "split": "dirichlet"}, "segmentation task with no per-sample label: use split 'iid'"),
    ({"kind": "synthetic-seg3d", "image_size": 8}, "data.image_size must be >= 16 for kind 'synthetic-seg3d', got 8"),
    ({"kind": "synthetic-seg2d", "samples": 0}, "data.samples must be an int >= 1"),
    ({"alpha": float("nan")}, "data.alpha must be a finite number > 0"),
    ({"val_fraction": True}, "data.val_fraction must be a number strictly between 0 and 1"),
])
def test_single_problems(kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig(**kwargs)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        DataConfig("breast-cancer")  # type: ignore[misc]


def test_sites_and_seed_problems() -> None:
    config = DataConfig()
    assert data_problems(config, sites=["a", "b"]) == []
    assert "at least one site" in data_problems(config, sites=[])[0]
    assert "repeated: ['a']" in data_problems(config, sites=["a", "b", "a"])[0]
    assert "not the single string" in data_problems(config, sites="abc")[0]
    assert "non-empty strings" in data_problems(config, sites=["a", " "])[0]
    with pytest.raises(ConfigError, match="seed must be an int >= 0, got -1"):
        load_task(config, sites=["a"], seed=-1)


def test_too_few_samples_for_the_sites_says_how_many() -> None:
    sites = [f"site-{i}" for i in range(120)]
    problems = data_problems(DataConfig(), sites=sites)
    assert len(problems) == 1
    assert "'breast-cancer' has 569 samples, but 120 sites need at least" in problems[0]
    assert "use at most 113 sites" in problems[0]
    small = DataConfig(kind="synthetic-seg2d", samples=10)
    message = data_problems(small, sites=["a", "b", "c"])[0]
    assert "has 10 samples, but 3 sites need at least 15" in message and "raise data.samples to 15" in message
    with pytest.raises(ConfigError, match="raise data.samples"):
        load_task(small, sites=["a", "b", "c"], seed=0)


def test_synthetic_memory_limit() -> None:
    huge = DataConfig(kind="synthetic-seg3d", samples=1000, image_size=128)
    assert any("GiB in memory" in p and "lower data.samples or data.image_size" in p
               for p in data_problems(huge, sites=["a"]))


def test_folder_site_names_needs_an_image_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only with kind 'image-folder'"):
        folder_site_names(DataConfig())
    with pytest.raises(ConfigError, match="has no sub-folders"):
        folder_site_names(DataConfig(kind="image-folder", path=tmp_path, split="by-folder"))


def test_public_surface() -> None:
    for name in data.__all__:
        assert hasattr(data, name), name


def test_import_loads_no_heavy_library() -> None:
    heavy = {"torch", "monai", "PIL", "nibabel", "pydicom", "sklearn", "scipy"}
    code = ("import sys, securefed.data; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
