"""The user's MedMNIST-format ``.npz`` file (kind ``"medmnist"``).

The file holds the six arrays MedMNIST (Yang et al. 2023) distributes: ``train_images``,
``train_labels``, ``val_images``, ``val_labels``, ``test_images`` and ``test_labels``. Images are
grey ``(N, H, W)``, colour ``(N, H, W, 3)`` (or ``(N, H, W, 1)``), or grey volumes
``(N, D, H, W)`` as in the 3D MedMNIST sets; any size. uint8 pixels are divided by 255; any
other dtype is min-max scaled to [0, 1] with one minimum and maximum over the whole file.
Images become float32 ``(N, C, H, W)`` (volumes ``(N, 1, D, H, W)``), resized to
``image_size`` per side when that is set.

Labels are ``(N,)`` or ``(N, 1)`` non-negative integers; ``num_classes`` is the largest label
plus one over all three splits. Multi-column labels (the multi-label ChestMNIST, or one-hot
rows) are rejected rather than guessed at: securefed trains single-label classifiers only.

MedMNIST's own split is kept: train and val are pooled and shared out among the sites (each
of which then holds out ``val_fraction``), and ``test_images`` is the global test set, so
``test_fraction`` is not used.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .config import DataConfig
from .resize import resize_linear
from .source import Source
from .types import ArrayDataset, DataKind, TaskKind, TaskSpec

__all__ = ["MEDMNIST_KEYS", "medmnist_problems", "load_medmnist"]

MEDMNIST_KEYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")
_SPLITS = ("train", "val", "test")


def medmnist_problems(config: DataConfig) -> list[str]:
    """Cheap checks of the ``.npz`` file: it exists, is a numpy archive and has the six arrays."""
    path = config.path
    if path is None:
        return []  # DataConfig already reported the missing path
    if not path.exists():
        return [f"data.path {str(path)!r} does not exist: set it to your MedMNIST .npz file "
                "(e.g. pathmnist.npz)"]
    if path.is_dir():
        return [f"data.path {str(path)!r} is a folder, but kind 'medmnist' reads one .npz file: "
                "point path at the file, or use kind 'image-folder' for a folder of images"]
    try:
        with zipfile.ZipFile(path) as archive:
            found = sorted(name[:-4] if name.endswith(".npy") else name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        return [f"data.path {str(path)!r} is not a readable .npz archive ({exc}); save one with "
                f"numpy.savez(path, {', '.join(k + '=...' for k in MEDMNIST_KEYS)})"]
    missing = [key for key in MEDMNIST_KEYS if key not in found]
    if missing:
        return [f"data.path {str(path)!r} lacks the arrays {missing}: a MedMNIST .npz needs "
                f"{list(MEDMNIST_KEYS)}, this file has {found}"]
    return []


def _layout(images: np.ndarray) -> tuple[int, int] | None:
    """(channels, spatial dims) of an image array, or None if no MedMNIST layout fits."""
    if images.ndim == 3:
        return 1, 2
    if images.ndim == 4:
        return (images.shape[3], 2) if images.shape[3] in (1, 3) else (1, 3)
    return None


def _channel_first(images: np.ndarray, dims: int) -> np.ndarray:
    if dims == 2 and images.ndim == 4:
        return np.moveaxis(images, 3, 1)
    return images[:, None]


def _labels(raw: np.ndarray, split: str, count: int, problems: list[str]) -> np.ndarray | None:
    labels = np.asarray(raw)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 2:
        problems.append(f"{split}_labels has {labels.shape[1]} columns (multi-label or one-hot, "
                        "as in ChestMNIST); securefed supports single-label classification only: "
                        "save one label column per image, shape (N,) or (N, 1)")
        return None
    if labels.ndim != 1:
        problems.append(f"{split}_labels must have shape (N,) or (N, 1), got {labels.shape}")
        return None
    if labels.shape[0] != count:
        problems.append(f"{split}_images has {count} images but {split}_labels has {labels.shape[0]} "
                        "labels: they must match one to one")
        return None
    if labels.size and (not np.issubdtype(labels.dtype, np.number) or np.any(labels != np.round(labels))
                        or labels.min() < 0):
        problems.append(f"{split}_labels must be non-negative integers (class ids), got dtype "
                        f"{labels.dtype} with values like {labels[:3].tolist()}")
        return None
    return labels.astype(np.int64)


def load_medmnist(config: DataConfig) -> Source:
    """Read, check and convert the ``.npz`` file of ``config`` (ConfigError with every problem)."""
    problems = medmnist_problems(config)
    if problems:
        raise ConfigError(problems)
    path = Path(config.path)  # type: ignore[arg-type]
    try:
        with np.load(path, allow_pickle=False) as archive:
            raw = {key: archive[key] for key in MEDMNIST_KEYS}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"data.path {str(path)!r}: cannot read its arrays ({exc})") from exc

    layouts, labels = {}, {}
    for split in _SPLITS:
        images = raw[f"{split}_images"]
        layouts[split] = _layout(images)
        if layouts[split] is None:
            problems.append(f"{split}_images has shape {images.shape}; expected (N, H, W) grey, "
                            "(N, H, W, 3) colour or (N, D, H, W) volumes")
        labels[split] = _labels(raw[f"{split}_labels"], split, len(images), problems)
    if not problems:
        problems.extend(_consistency_problems(raw, layouts, labels, config.image_size))
    if problems:
        raise ConfigError([f"data.path {str(path)!r}: {p}" for p in problems])

    channels, dims = layouts["train"]  # type: ignore[misc]
    scale = _scaler([raw[f"{s}_images"] for s in _SPLITS])
    converted = {}
    for split in _SPLITS:
        images = scale(_channel_first(raw[f"{split}_images"], dims))
        if config.image_size is not None:
            images = resize_linear(images, config.image_size, spatial_dims=dims)
        converted[split] = ArrayDataset(inputs=images, targets=labels[split])
    pool = ArrayDataset(inputs=np.concatenate([converted["train"].inputs, converted["val"].inputs]),
                        targets=np.concatenate([converted["train"].targets, converted["val"].targets]))
    num_classes = int(max(int(labels[s].max()) for s in _SPLITS if labels[s].size)) + 1
    spec = TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=pool.inputs.shape[1:],
                    spatial_dims=dims, num_classes=num_classes)
    shape = "x".join(str(d) for d in pool.inputs.shape[2:])
    return Source(name=DataKind.MEDMNIST.value, spec=spec, data=pool, test=converted["test"],
                  description=f"medmnist: {path.name}, {len(pool)} train+val and {len(converted['test'])} "
                              f"test images of {channels}x{shape}, {num_classes} classes")


def _consistency_problems(raw: dict, layouts: dict, labels: dict, image_size: int | None) -> list[str]:
    problems = []
    if len(raw["train_images"]) + len(raw["val_images"]) == 0:
        problems.append("train_images and val_images are both empty: the sites need images to train on")
    if len(raw["test_images"]) == 0:
        problems.append("test_images is empty: the global test set needs images")
    if len({layouts[s] for s in _SPLITS}) > 1:
        problems.append(f"the splits disagree on the image layout (channels, spatial dims): "
                        f"{ {s: layouts[s] for s in _SPLITS} }")
    elif image_size is None and len({raw[f'{s}_images'].shape[1:] for s in _SPLITS}) > 1:
        shapes = {s: raw[f"{s}_images"].shape[1:] for s in _SPLITS}
        problems.append(f"the splits have different image sizes {shapes}: set data.image_size "
                        "to resize every image to one size")
    present = [labels[s] for s in _SPLITS if labels[s] is not None and labels[s].size]
    if present and max(int(lab.max()) for lab in present) < 1:
        problems.append("every label is 0: classification needs at least 2 classes")
    return problems


def _scaler(arrays: list[np.ndarray]):
    """uint8 -> /255; anything else -> one min-max over every split (float32 in [0, 1])."""
    if all(a.dtype == np.uint8 for a in arrays):
        return lambda a: a.astype(np.float32) / np.float32(255)
    nonempty = [a for a in arrays if a.size]
    low = min(float(a.min()) for a in nonempty)
    high = max(float(a.max()) for a in nonempty)
    span = high - low if high > low else 1.0
    return lambda a: ((a.astype(np.float32) - np.float32(low)) / np.float32(span)).astype(np.float32)
