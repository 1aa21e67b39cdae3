"""The user's folder of labelled images (kind ``"image-folder"``), read into one pooled source.

The layouts and the labels CSV are described in :mod:`securefed.data.folder_layout`, the
readers (PNG/JPEG/BMP/TIFF, NIfTI, DICOM) in :mod:`securefed.data.image_io`.

Every image must have the same number of spatial dimensions (all 2D images or all 3D volumes).
Grey and colour 2D images may be mixed: grey ones are then repeated to 3 channels. Without
``image_size`` every image must have the same size (the first image's size is kept; a folder
with several sizes is a ConfigError that lists them and says to set ``image_size``); with it,
each image is resized linearly to ``image_size`` per side, i.e. ``(C, s, s)`` or ``(1, s, s, s)``.

The global test set is ``test_fraction`` of the pooled images, stratified by label; with the
by-folder split, ``test_fraction`` of each folder (stratified within the folder).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, MissingDependencyError
from .config import DataConfig
from .folder_layout import LabelTable, label_ids, read_tables
from .image_io import read_image
from .resize import resize_linear
from .source import Source
from .splitters import group_size_problems, size_problems
from .types import ArrayDataset, DataKind, SplitKind, TaskKind, TaskSpec

__all__ = ["folder_problems", "load_image_folder"]

_SHOWN = 5


def _size_problems(config: DataConfig, tables: Sequence[LabelTable], sites: Sequence[str]) -> list[str]:
    what = f"the image folder {str(config.path)!r}"
    if config.split is SplitKind.BY_FOLDER:
        return group_size_problems([(t.site or "", len(t.rows)) for t in tables], config.test_fraction,
                                   what=what)
    return size_problems(sum(len(t.rows) for t in tables), len(sites), config.test_fraction, what=what,
                         hint=", or add images")


def folder_problems(config: DataConfig, *, sites: Sequence[str]) -> list[str]:
    """Every problem found without reading an image: the folder, its CSVs, listed files, sizes."""
    problems: list[str] = []
    tables = read_tables(config, sites, problems)
    label_ids(tables, problems)
    if not problems:
        problems.extend(_size_problems(config, tables, sites))
    return problems


def _read_all(tables: Sequence[LabelTable], problems: list[str]) -> list[np.ndarray]:
    images = []
    for table in tables:
        for row in table.rows:
            try:
                images.append(read_image(row.path))
            except MissingDependencyError:
                raise
            except Exception as exc:  # noqa: BLE001 - any reader failure is a bad user file
                problems.append(f"{str(row.path)!r} (line {row.line} of {str(table.csv_path)!r}) cannot "
                                f"be read as an image: {type(exc).__name__}: {exc}")
    return images


def _common_shape(images: list[np.ndarray], names: list[str], image_size: int | None,
                  problems: list[str]) -> tuple[int, int] | None:
    """(channels, spatial dims) every image is brought to, or None (with problems) if impossible."""
    dims = {name: im.ndim - 1 for name, im in zip(names, images)}
    if len(set(dims.values())) > 1:
        example = {d: next(n for n, nd in dims.items() if nd == d) for d in sorted(set(dims.values()))}
        problems.append("the folder mixes 2D images and 3D volumes (e.g. "
                        + ", ".join(f"{n!r} is {d}D" for d, n in example.items())
                        + "): use one kind per folder")
        return None
    spatial = next(iter(dims.values()))
    channels = {im.shape[0] for im in images}
    if image_size is None:
        sizes: dict[tuple[int, ...], str] = {}
        for name, im in zip(names, images):
            sizes.setdefault(im.shape[1:], name)
        if len(sizes) > 1:
            listed = [f"{n!r} is {'x'.join(map(str, s))}" for s, n in list(sizes.items())[:_SHOWN]]
            problems.append(f"the images have {len(sizes)} different sizes ({', '.join(listed)}): "
                            "set data.image_size to resize every image to one size")
            return None
    return max(channels), spatial


def load_image_folder(config: DataConfig, *, sites: Sequence[str]) -> Source:
    """Read the folder of ``config`` into a pooled source (ConfigError listing every problem)."""
    problems: list[str] = []
    tables = read_tables(config, sites, problems)
    mapping, class_names = label_ids(tables, problems)
    if problems:
        raise ConfigError(problems)
    images = _read_all(tables, problems)
    if problems:
        raise ConfigError(problems)
    names = [str(row.path) for table in tables for row in table.rows]
    shape = _common_shape(images, names, config.image_size, problems)
    targets = np.array([mapping[row.label] for table in tables for row in table.rows], dtype=np.int64)
    num_classes = int(targets.max()) + 1 if class_names is None else len(class_names)
    if num_classes < 2:
        problems.append(f"every image has the label {int(targets.max())}: classification needs at least 2 classes")
    if problems or shape is None:
        raise ConfigError(problems)
    channels, spatial = shape
    stacked = np.stack([_fit(im, channels, spatial, config.image_size) for im in images])
    data = ArrayDataset(inputs=stacked, targets=targets)
    groups = None
    if config.split is SplitKind.BY_FOLDER:
        bounds = np.cumsum([0] + [len(t.rows) for t in tables])
        groups = tuple((t.site or "", np.arange(bounds[i], bounds[i + 1])) for i, t in enumerate(tables))
    spec = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=stacked.shape[1:], spatial_dims=spatial,
                    num_classes=num_classes)
    classes = (f"classes {', '.join(f'{n}={i}' for i, n in enumerate(class_names))}"
               if class_names else f"{num_classes} classes")
    size = "x".join(map(str, stacked.shape[1:]))
    layout = f", by folder ({', '.join(t.site or '' for t in tables)})" if groups else ""
    return Source(name=DataKind.IMAGE_FOLDER.value, spec=spec, data=data, groups=groups,
                  description=f"image-folder: {len(data)} images of {size} from "
                              f"{_folder_name(config)!r}{layout}, {classes}")


def _folder_name(config: DataConfig) -> str:
    path = config.path
    return (path.resolve().name or str(path)) if path is not None else ""


def _fit(image: np.ndarray, channels: int, spatial: int, image_size: int | None) -> np.ndarray:
    if image.shape[0] != channels:  # grey among colour images
        image = np.repeat(image, channels, axis=0)
    if image_size is not None:
        image = resize_linear(image, image_size, spatial_dims=spatial)
    return image
