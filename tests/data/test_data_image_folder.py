"""Image folders written here with Pillow, nibabel and pydicom: formats, labels, by-folder, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from securefed.data import DataConfig, data_problems, folder_site_names, load_task
from securefed.errors import ConfigError


def _png(path: Path, value: int, size: tuple[int, int] = (12, 10), mode: str = "L") -> None:
    from PIL import Image

    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def _nifti(path: Path, volume: np.ndarray) -> None:
    import nibabel

    nibabel.save(nibabel.Nifti1Image(volume.astype(np.float32), affine=np.eye(4)), str(path))


def _dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "file,label") -> None:
    path.write_text(header + "\n" + "".join(f"{f},{lab}\n" for f, lab in rows))


def _png_folder(folder: Path, count: int = 12, names: tuple[str, str] = ("benign", "malignant")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        label = names[i % 2]
        _png(folder / f"img{i}.png", value=40 if label == names[0] else 200)
        rows.append((f"img{i}.png", label))
    _csv(folder / "labels.csv", rows)
    return folder


def _cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(kind="image-folder", path=path, **kw)


def test_png_folder_with_label_names(tmp_path: Path) -> None:
    folder = _png_folder(tmp_path / "scans", count=20)
    task = load_task(_cfg(folder), sites=["a", "b"], seed=0)
    assert task.spec.input_shape == (1, 10, 12) and task.spec.num_classes == 2
    assert "benign=0" in task.description and "malignant=1" in task.description
    splits = [task.test] + [s.train for s in task.sites] + [s.val for s in task.sites]
    assert sum(len(s) for s in splits) == 20 and len(task.test) == 4
    for split in splits:  # names map in sorted order and pixels are scaled by 255
        expected = np.where(split.targets == 0, 40 / 255, 200 / 255)
        np.testing.assert_allclose(split.inputs.reshape(len(split), -1).mean(axis=1), expected, atol=1e-6)
    assert np.bincount(task.test.targets).tolist() == [2, 2]  # stratified


def test_rgb_and_grey_mixed_and_resized(tmp_path: Path) -> None:
    folder = _png_folder(tmp_path / "mixed", count=10)
    _png(folder / "img0.png", value=90, size=(20, 20), mode="RGB")  # another size and colour
    with pytest.raises(ConfigError, match=r"2 different sizes.*set data.image_size"):
        load_task(_cfg(folder), sites=["a"], seed=0)
    task = load_task(_cfg(folder, image_size=8), sites=["a"], seed=0)
    assert task.spec.input_shape == (3, 8, 8)


def test_nifti_volumes_and_dicom_slices(tmp_path: Path) -> None:
    vols = tmp_path / "vols"
    vols.mkdir()
    rows = []
    for i in range(10):
        volume = np.zeros((6, 6, 4))
        volume[i % 3, 0, 0] = 100.0 + i  # min-max scaling puts the bright voxel at exactly 1
        _nifti(vols / f"v{i}.nii.gz", volume)
        rows.append((f"v{i}.nii.gz", str(i % 2)))
    _csv(vols / "labels.csv", rows)
    task = load_task(_cfg(vols), sites=["a"], seed=0)
    assert task.spec.input_shape == (1, 6, 6, 4) and task.spec.spatial_dims == 3
    assert task.test.inputs.max() == 1.0 and task.test.inputs.min() == 0.0

    slices = tmp_path / "slices"
    slices.mkdir()
    rows = []
    for i in range(10):
        _dicom(slices / f"s{i}.dcm", np.arange(48).reshape(6, 8) * (i + 1))
        rows.append((f"s{i}.dcm", str(i % 3)))
    _csv(slices / "labels.csv", rows)
    task = load_task(_cfg(slices), sites=["a"], seed=0)
    assert task.spec.input_shape == (1, 6, 8) and task.spec.num_classes == 3
    np.testing.assert_allclose(task.test.inputs[0, 0], np.arange(48).reshape(6, 8) / 47, atol=1e-6)


def test_by_folder_sites_are_the_sub_folders(tmp_path: Path) -> None:
    root = tmp_path / "hospitals"
    _png_folder(root / "kings", count=10)
    _png_folder(root / "guys", count=15)
    (root / ".cache").mkdir()
    config = _cfg(root, split="by-folder")
    assert folder_site_names(config) == ["guys", "kings"]
    task = load_task(config, sites=["kings", "guys"], seed=0)
    assert [s.name for s in task.sites] == ["kings", "guys"]
    assert [len(s.train) + len(s.val) for s in task.sites] == [8, 12]  # 20% of each folder is test
    assert len(task.test) == 5
    problems = data_problems(config, sites=["kings", "guys", "barts"])
    assert any("found 2 sub-folders ['guys', 'kings']" in p and "3 sites" in p for p in problems)
    assert any("['barts'] have no sub-folder" in p for p in problems)
    with pytest.raises(ConfigError, match="no sub-folder"):
        load_task(config, sites=["kings", "st-thomas"], seed=0)


def test_bad_folder_reports_every_problem_at_once(tmp_path: Path) -> None:
    folder = _png_folder(tmp_path / "bad", count=6)
    _csv(folder / "labels.csv", [("img0.png", "0"), ("img1.png", "benign"), ("gone.png", "1"),
                                 ("notes.txt", "1"), ("img2.png", "")])
    problems = data_problems(_cfg(folder), sites=["a"])
    text = " | ".join(problems)
    assert "'gone.png'" in text and "do not exist" in text
    assert "'notes.txt'" in text and "unsupported" in text and ".dcm" in text
    assert "line 6" in text  # the row without a label
    assert "mix class ids '0', '1' with class names 'benign'" in text
    with pytest.raises(ConfigError) as info:
        load_task(_cfg(folder), sites=["a"], seed=0)
    assert len(info.value.problems) == len(problems) == 4


def test_csv_columns_missing_folder_and_unreadable_image(tmp_path: Path) -> None:
    folder = _png_folder(tmp_path / "cols", count=6)
    _csv(folder / "labels.csv", [("img0.png", "0")], header="path,class")
    assert any("columns ['path', 'class']" in p and "'file' and 'label'" in p
               for p in data_problems(_cfg(folder), sites=["a"]))
    for split in ("iid", "by-folder"):
        missing = data_problems(_cfg(tmp_path / "nope", split=split), sites=["a"])
        assert len(missing) == 1 and "nope" in missing[0] and "does not exist" in missing[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert any("labels.csv" in p and "does not exist" in p for p in data_problems(_cfg(empty), sites=["a"]))

    broken = _png_folder(tmp_path / "broken", count=12)
    (broken / "img3.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"img3.png.*line 5.*cannot be read as an image"):
        load_task(_cfg(broken), sites=["a"], seed=0)


def test_too_few_images_single_class_and_mixed_dims(tmp_path: Path) -> None:
    folder = _png_folder(tmp_path / "few", count=8)
    problems = data_problems(_cfg(folder), sites=["a", "b"])
    assert any("has 8 samples, but 2 sites need at least 10" in p and "add images" in p for p in problems)
    one = _png_folder(tmp_path / "one", count=8, names=("x", "x"))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        load_task(_cfg(one), sites=["a"], seed=0)
    mixed = _png_folder(tmp_path / "dims", count=8)
    _nifti(mixed / "vol.nii", np.ones((4, 4, 4)))
    _csv(mixed / "labels.csv", [(f"img{i}.png", str(i % 2)) for i in range(8)] + [("vol.nii", "1")])
    with pytest.raises(ConfigError, match="mixes 2D images and 3D volumes"):
        load_task(_cfg(mixed, image_size=4), sites=["a"], seed=0)
