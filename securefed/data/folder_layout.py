"""Where an image folder's files and labels are, checked without reading any image.

Two layouts (kind ``"image-folder"``):

- **pooled** (split ``"iid"`` or ``"dirichlet"``): ``<path>/labels.csv`` (or ``labels_csv``)
  lists every image; the data is pooled and shared out among the sites.
- **by folder** (split ``"by-folder"``): one sub-folder of ``<path>`` per hospital, each with
  its own ``labels.csv`` (the file name of ``labels_csv`` if set); the site names are the
  sub-folder names (hidden folders, starting with ``.``, are ignored).

A labels CSV has a header row with the columns ``file`` and ``label`` (others are ignored):
``file`` is relative to the folder the CSV describes, ``label`` is either a non-negative class
id or a class name. Names are mapped to ids in sorted order over every CSV of the folder;
one folder may not mix ids and names.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .config import DataConfig
from .image_io import SUFFIXES, image_format
from .types import DataKind, SplitKind

__all__ = ["LabelledFile", "LabelTable", "folder_site_names", "read_tables", "label_ids"]

DEFAULT_LABELS = "labels.csv"
_INT = re.compile(r"^[+-]?\d+$")
_SHOWN = 5  # how many offending entries a problem lists before summarising


@dataclass(frozen=True)
class LabelledFile:
    """One row of a labels CSV."""

    path: Path
    label: str
    line: int


@dataclass(frozen=True)
class LabelTable:
    """The labelled files of one folder; ``site`` is the folder's name in the by-folder layout."""

    site: str | None
    csv_path: Path
    rows: tuple[LabelledFile, ...]


def _shown(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _subfolders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _root_problems(config: DataConfig) -> list[str]:
    path = config.path
    if path is None:
        return []  # DataConfig already reported it
    if not path.exists():
        return [f"data.path {str(path)!r} does not exist: set it to the folder holding your images"]
    if not path.is_dir():
        return [f"data.path {str(path)!r} is a file, but kind 'image-folder' needs a folder of images"
                + (" (for a .npz file use kind 'medmnist')" if path.suffix == ".npz" else "")]
    return []


def folder_site_names(config: DataConfig) -> list[str]:
    """The by-folder site names: the sub-folders of ``config.path``, sorted (ConfigError if none)."""
    problems = [] if config.kind is DataKind.IMAGE_FOLDER else [
        f"site names come from sub-folders only with kind 'image-folder', not {config.kind.value!r}"]
    problems += _root_problems(config)
    if problems:
        raise ConfigError(problems)
    names = _subfolders(config.path)  # type: ignore[arg-type]
    if not names:
        raise ConfigError(f"data.path {str(config.path)!r} has no sub-folders; split 'by-folder' "
                          "needs one sub-folder per site, each with its own labels.csv")
    return names


def _site_problems(path: Path, folders: list[str], sites: Sequence[str]) -> list[str]:
    problems = []
    if not folders:
        return [f"data.path {str(path)!r} has no sub-folders; split 'by-folder' needs one sub-folder "
                "per site, each with its own labels.csv"]
    if len(folders) != len(sites):
        problems.append(f"split 'by-folder' found {len(folders)} sub-folders {folders} in {str(path)!r} "
                        f"but {len(sites)} sites are configured: configure one site per sub-folder")
    unknown = [s for s in sites if s not in folders]
    unused = [f for f in folders if f not in sites]
    if unknown:
        problems.append(f"sites {unknown} have no sub-folder in {str(path)!r} (split 'by-folder' "
                        f"names sites after their folders, which are {folders})"
                        + (f"; folders without a site: {unused}" if unused else ""))
    return problems


def read_tables(config: DataConfig, sites: Sequence[str], problems: list[str]) -> list[LabelTable]:
    """Parse every labels CSV of the folder; append every problem found to ``problems``."""
    root = _root_problems(config)
    if root or config.path is None:
        problems.extend(root)
        return []
    path = config.path
    if config.split is SplitKind.BY_FOLDER:
        folders = _subfolders(path)
        site_problems = _site_problems(path, folders, sites)
        if site_problems:
            problems.extend(site_problems)
            return []
        name = config.labels_csv.name if config.labels_csv is not None else DEFAULT_LABELS
        places = [(site, path / site, path / site / name) for site in sites]
    else:
        places = [(None, path, config.labels_csv or path / DEFAULT_LABELS)]
    tables = [_read_table(site, folder, csv_path, problems) for site, folder, csv_path in places]
    return [t for t in tables if t is not None]


def _read_table(site: str | None, folder: Path, csv_path: Path, problems: list[str]) -> LabelTable | None:
    where = f"labels CSV {str(csv_path)!r}"
    if not csv_path.is_file():
        problems.append(f"{where} does not exist: write one with a header row 'file,label' and one row "
                        "per image" + (" (or set data.labels_csv)" if site is None else ""))
        return None
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            body = list(enumerate(reader, start=2))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{where} cannot be read as UTF-8 CSV ({exc})")
        return None
    if "file" not in header or "label" not in header:
        problems.append(f"{where} has the columns {header}; it needs a header row with the columns "
                        "'file' and 'label'")
        return None
    file_col, label_col = header.index("file"), header.index("label")
    rows, blank, missing, unsupported, repeated, seen = [], [], [], [], [], set()
    for line, cells in body:
        if not any(c.strip() for c in cells):
            continue  # a blank line
        file = cells[file_col].strip() if file_col < len(cells) else ""
        label = cells[label_col].strip() if label_col < len(cells) else ""
        if not file or not label:
            blank.append(f"line {line}")
            continue
        image = folder / file
        if file in seen:
            repeated.append(repr(file))
        seen.add(file)
        if image_format(image) is None:
            unsupported.append(repr(file))
        elif not image.is_file():
            missing.append(repr(file))
        rows.append(LabelledFile(path=image, label=label, line=line))
    if blank:
        problems.append(f"{where} has rows without a file or a label: {_shown(blank)}")
    if missing:
        problems.append(f"{where} lists {len(missing)} files that do not exist in {str(folder)!r}: "
                        f"{_shown(missing)} (file names are relative to that folder)")
    if unsupported:
        problems.append(f"{where} lists files of unsupported types: {_shown(unsupported)}; supported "
                        f"suffixes are {list(SUFFIXES)}")
    if repeated:
        problems.append(f"{where} lists some files more than once: {_shown(repeated)}")
    if not rows and not blank:
        problems.append(f"{where} lists no images")
    return LabelTable(site=site, csv_path=csv_path, rows=tuple(rows))


def label_ids(tables: Sequence[LabelTable], problems: list[str]) -> tuple[dict[str, int], list[str] | None]:
    """Map every label string to a class id; also return the class names (None for numeric ids).

    All labels must be non-negative integers, or all names (sorted to give the ids).
    """
    labels = sorted({row.label for table in tables for row in table.rows})
    numbers = [lab for lab in labels if _INT.fullmatch(lab)]
    names = [lab for lab in labels if not _INT.fullmatch(lab)]
    if numbers and names:
        problems.append(f"the labels mix class ids {_shown([repr(n) for n in numbers])} with class names "
                        f"{_shown([repr(n) for n in names])}: "
                        "use ids (0, 1, ...) for every image or names for every image")
        return {}, None
    if names:
        return {name: i for i, name in enumerate(names)}, names
    negative = [n for n in numbers if int(n) < 0]
    if negative:
        problems.append(f"class ids must be >= 0, got {_shown(negative)}; use 0, 1, ... or class names")
    return {n: int(n) for n in numbers}, None
