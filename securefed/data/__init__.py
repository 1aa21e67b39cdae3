"""Federated data: embedded tasks and the user's own images, shared out among sites (numpy only).

- **Tasks** (:mod:`.embedded`, :mod:`.medmnist`, :mod:`.image_folder`): ``breast-cancer``
  (scikit-learn's bundled Wisconsin data), ``synthetic-seg2d`` / ``synthetic-seg3d`` (MONAI's
  generated discs and balls), and the user's ``medmnist`` ``.npz`` file or ``image-folder``
  (PNG/JPEG, NIfTI, DICOM with a labels CSV). Nothing is downloaded.
- **Splits** (:mod:`.splitters`): IID, Dirichlet label skew, or one folder per site; each site
  holds out a validation split and a global test set is kept apart from every site.
- **Entry points** (:mod:`.tasks`): :func:`load_task` (deterministic given the seed),
  :func:`data_problems` (checks before loading), :func:`folder_site_names`.

scikit-learn, MONAI, Pillow, nibabel and pydicom are imported only when a task needs them, so
``import securefed.data`` loads none of them (nor torch).
"""

from __future__ import annotations

from .config import DataConfig
from .tasks import data_problems, folder_site_names, load_task
from .types import ArrayDataset, DataKind, FederatedTask, SiteData, SplitKind, TaskKind, TaskSpec

__all__ = [
    "ArrayDataset",
    "DataConfig",
    "DataKind",
    "FederatedTask",
    "SiteData",
    "SplitKind",
    "TaskKind",
    "TaskSpec",
    "data_problems",
    "folder_site_names",
    "load_task",
]
