"""The value types of :mod:`securefed.data`: what a federated task is made of (numpy only).

A :class:`FederatedTask` is a :class:`TaskSpec` (what a model must fit), one :class:`SiteData`
per hospital (its training split and its held-out validation split) and a global test set.
Every split is an :class:`ArrayDataset`: float32 inputs and int64 targets in two numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

__all__ = ["TaskKind", "DataKind", "SplitKind", "ArrayDataset", "TaskSpec", "SiteData", "FederatedTask"]


class TaskKind(Enum):
    """What a model predicts: one label per sample, or one class id per voxel."""

    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


class DataKind(Enum):
    """Where the data comes from: an embedded task, or the user's own files."""

    BREAST_CANCER = "breast-cancer"
    SYNTHETIC_SEG2D = "synthetic-seg2d"
    SYNTHETIC_SEG3D = "synthetic-seg3d"
    MEDMNIST = "medmnist"
    IMAGE_FOLDER = "image-folder"


class SplitKind(Enum):
    """How the pooled data is shared out among the sites."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    BY_FOLDER = "by-folder"


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Samples as two aligned arrays.

    ``inputs`` is float32: tabular ``(N, F)``, images ``(N, C, H, W)`` or volumes
    ``(N, C, D, H, W)``. ``targets`` is int64: class ids ``(N,)`` for classification, or
    ``(N, 1, *spatial)`` per-voxel class ids for segmentation. Other dtypes are converted on
    construction; arrays whose first dimensions differ are rejected.
    """

    inputs: np.ndarray
    targets: np.ndarray

    def __post_init__(self) -> None:
        inputs = np.asarray(self.inputs, dtype=np.float32)
        targets = np.asarray(self.targets, dtype=np.int64)
        if inputs.ndim < 1 or targets.ndim < 1:
            raise ValueError("ArrayDataset needs arrays with a leading sample dimension")
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"ArrayDataset has {inputs.shape[0]} inputs but {targets.shape[0]} targets; "
                             "they must be aligned one to one")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "targets", targets)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayDataset:
        """The samples at ``indices`` (in that order), as a new dataset holding copies."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ArrayDataset(inputs=self.inputs[index], targets=self.targets[index])


@dataclass(frozen=True)
class TaskSpec:
    """What a model must fit.

    ``input_shape`` is one sample's shape, e.g. ``(30,)``, ``(1, 64, 64)`` or ``(1, 32, 32, 32)``;
    ``spatial_dims`` is 0 for tabular data, else 2 or 3; ``num_classes`` counts labels for
    classification and classes including background for segmentation (2 for binary).
    """

    kind: TaskKind
    input_shape: tuple[int, ...]
    spatial_dims: int
    num_classes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TaskKind(self.kind))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))


@dataclass(frozen=True, eq=False)
class SiteData:
    """One hospital's data: what it trains on and what it holds out to evaluate on."""

    name: str
    train: ArrayDataset
    val: ArrayDataset


@dataclass(frozen=True, eq=False)
class FederatedTask:
    """A task shared out among sites, with a global test set no site trains on."""

    name: str
    spec: TaskSpec
    sites: tuple[SiteData, ...]
    test: ArrayDataset
    description: str

    def site(self, name: str) -> SiteData:
        """The site called ``name`` (KeyError naming the known sites otherwise)."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"no site {name!r}; the sites are {[s.name for s in self.sites]}")
