"""The pooled form every loader returns before the data is shared out among sites (internal)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .types import ArrayDataset, TaskKind, TaskSpec

__all__ = ["Source"]


@dataclass(frozen=True, eq=False)
class Source:
    """Loaded data, not yet split.

    ``data`` is every sample the sites share (and the global test set is cut from, unless
    ``test`` is the source's own test set). ``groups`` (by-folder only) maps each folder name to
    the indices of its samples in ``data``. ``standardise`` asks for features to be standardised
    with statistics of the sites' training splits once the split is known.
    """

    name: str
    description: str
    spec: TaskSpec
    data: ArrayDataset
    test: ArrayDataset | None = None
    groups: tuple[tuple[str, np.ndarray], ...] | None = None
    standardise: bool = False

    @property
    def labels(self) -> np.ndarray | None:
        """Per-sample class ids for stratified and skewed splits; None for segmentation."""
        return self.data.targets if self.spec.kind is TaskKind.CLASSIFICATION else None
