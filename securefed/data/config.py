"""The ``[data]`` settings of a federated run, validated on construction (no file access here).

Strings are accepted for the enum and path fields (``kind="medmnist"``, ``path="scans.npz"``)
and converted in ``__post_init__``; every problem found is reported at once in one
:class:`~securefed.errors.ConfigError`. Checks that need the file system (does the file exist,
does the folder have one sub-folder per site) live in :func:`securefed.data.data_problems`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

from ..errors import ConfigError
from .types import DataKind, SplitKind
from securefed._values import is_int, is_real

__all__ = ["DataConfig", "EMBEDDED_KINDS", "SYNTHETIC_KINDS", "USER_KINDS", "MIN_IMAGE_SIZE"]

SYNTHETIC_KINDS = frozenset({DataKind.SYNTHETIC_SEG2D, DataKind.SYNTHETIC_SEG3D})
EMBEDDED_KINDS = frozenset({DataKind.BREAST_CANCER}) | SYNTHETIC_KINDS
USER_KINDS = frozenset({DataKind.MEDMNIST, DataKind.IMAGE_FOLDER})
# Below these side lengths the synthetic shapes cannot be drawn (MONAI needs side > 2 * radius)
# and user images carry too little to learn from; both are far below any real use.
MIN_IMAGE_SIZE = {"synthetic": 16, "user": 4}

E = TypeVar("E", bound=Enum)


def _enum(value: object, cls: type[E], field: str, problems: list[str]) -> E | object:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.strip().lower().replace("_", "-"))
        except ValueError:
            pass
    known = [m.value for m in cls]
    problems.append(f"data.{field} must be one of {known}, got {value!r}")
    return value


def _path(value: object, field: str, problems: list[str]) -> Path | None | object:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (str, os.PathLike)):
        return Path(value).expanduser()
    problems.append(f"data.{field} must be a file system path (a string), got {value!r}")
    return value




@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which data a federated run uses and how it is shared out among the sites.

    ``kind``: an embedded task (``"breast-cancer"``, ``"synthetic-seg2d"``, ``"synthetic-seg3d"``)
    or the user's own data (``"medmnist"``: a MedMNIST-format ``.npz`` file; ``"image-folder"``:
    a folder of PNG/JPEG/NIfTI/DICOM images with a ``labels.csv``), which need ``path``.
    ``split``: ``"iid"``, ``"dirichlet"`` (label skew with concentration ``alpha``; classification
    only) or ``"by-folder"`` (image-folder only: one sub-folder per site). ``val_fraction`` of each
    site's data is held out for its evaluation; ``test_fraction`` of the data forms the global test
    set (MedMNIST files bring their own). ``samples`` (synthetic kinds only) is the number of
    images generated in total; ``image_size`` is the synthetic side length, or the side every
    user image is resized to. ``labels_csv`` (image-folder only) defaults to
    ``<path>/labels.csv``; with ``split="by-folder"`` only its file name is used, looked up in
    each sub-folder (default ``labels.csv``).
    """

    kind: DataKind = DataKind.BREAST_CANCER
    path: Path | None = None
    split: SplitKind = SplitKind.IID
    alpha: float = 0.5
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    samples: int | None = None
    image_size: int | None = None
    labels_csv: Path | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        kind = _enum(self.kind, DataKind, "kind", problems)
        split = _enum(self.split, SplitKind, "split", problems)
        path = _path(self.path, "path", problems)
        labels_csv = _path(self.labels_csv, "labels_csv", problems)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "split", split)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "labels_csv", labels_csv)

        if not is_real(self.alpha) or self.alpha <= 0:
            problems.append(f"data.alpha must be a finite number > 0 (smaller = more label skew, "
                            f"e.g. 0.1 strong, 100 nearly iid), got {self.alpha!r}")
        for field in ("val_fraction", "test_fraction"):
            value = getattr(self, field)
            if not is_real(value) or not 0 < value < 1:
                problems.append(f"data.{field} must be a number strictly between 0 and 1 "
                                f"(e.g. 0.2), got {value!r}")
        if self.samples is not None and (not is_int(self.samples) or self.samples < 1):
            problems.append(f"data.samples must be an int >= 1 (or unset for the default), got {self.samples!r}")
        if self.image_size is not None and not is_int(self.image_size):
            problems.append(f"data.image_size must be an int (or unset), got {self.image_size!r}")
        if isinstance(kind, DataKind):
            self._check_kind(kind, split, path, labels_csv, problems)
        if problems:
            raise ConfigError(problems)

    def _check_kind(self, kind: DataKind, split: object, path: object, labels_csv: object,
                    problems: list[str]) -> None:
        name = kind.value
        if kind in EMBEDDED_KINDS and path is not None:
            problems.append(f"data.path is set to {str(path)!r} but kind {name!r} is embedded and "
                            "reads no files; remove path, or use kind 'medmnist' or 'image-folder' "
                            "for your own data")
        if kind in USER_KINDS and path is None:
            what = "the MedMNIST .npz file" if kind is DataKind.MEDMNIST else "the image folder"
            problems.append(f"data.path is required for kind {name!r}: set it to {what}")
        if labels_csv is not None and kind is not DataKind.IMAGE_FOLDER:
            problems.append(f"data.labels_csv applies only to kind 'image-folder', not {name!r}; remove it")
        if self.samples is not None and kind not in SYNTHETIC_KINDS:
            problems.append(f"data.samples applies only to the synthetic kinds, not {name!r}; remove it")
        if is_int(self.image_size):
            if kind is DataKind.BREAST_CANCER:
                problems.append("data.image_size does not apply to 'breast-cancer' (tabular data); remove it")
            else:
                least = MIN_IMAGE_SIZE["synthetic" if kind in SYNTHETIC_KINDS else "user"]
                if self.image_size < least:
                    problems.append(f"data.image_size must be >= {least} for kind {name!r}, "
                                    f"got {self.image_size}")
        if split is SplitKind.BY_FOLDER and kind is not DataKind.IMAGE_FOLDER:
            problems.append(f"data.split 'by-folder' needs kind 'image-folder' (one sub-folder per "
                            f"site); kind {name!r} has no folders: use split 'iid' or 'dirichlet'")
        if split is SplitKind.DIRICHLET and kind in SYNTHETIC_KINDS:
            problems.append(f"data.split 'dirichlet' skews the label mix, but {name!r} is a "
                            "segmentation task with no per-sample label: use split 'iid'")
