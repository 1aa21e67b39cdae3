"""Loading a federated task: check the settings, load the source, share it out among the sites.

:func:`load_task` is deterministic given ``seed``: the synthetic images and every split draw
from streams derived from it, so the same configuration, sites and seed give the same arrays.
:func:`data_problems` runs the checks that need no data loading (files present, archive keys,
labels CSVs, enough samples for the sites) so a run can be refused before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from .config import SYNTHETIC_KINDS, DataConfig
from .embedded import embedded_samples, load_breast_cancer, load_synthetic, synthetic_problems
from .folder_layout import folder_site_names
from .image_folder import folder_problems, load_image_folder
from .medmnist import load_medmnist, medmnist_problems
from .source import Source
from .splitters import partition, samples_needed, size_problems
from .types import ArrayDataset, DataKind, FederatedTask, SiteData

__all__ = ["load_task", "data_problems", "folder_site_names"]

_SPLIT_STREAM = 0x5917  # the split's stream, apart from the synthetic generator's


def _sites_problems(sites: Sequence[str]) -> list[str]:
    if isinstance(sites, (str, bytes)):
        return [f"sites must be a list of site names, not the single string {sites!r}"]
    names = list(sites)
    if not names:
        return ["at least one site is needed"]
    problems = []
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        problems.append(f"site names must be non-empty strings, got {bad}")
    repeated = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if repeated:
        problems.append(f"site names must be unique; repeated: {repeated}")
    return problems


def _embedded_size_problems(config: DataConfig, num_sites: int) -> list[str]:
    available = embedded_samples(config)
    hint = ""
    if config.kind in SYNTHETIC_KINDS:
        hint = f", or raise data.samples to {samples_needed(num_sites, config.test_fraction)}"
    return size_problems(available, num_sites, config.test_fraction, what=f"{config.kind.value!r}", hint=hint)


def data_problems(config: DataConfig, *, sites: Sequence[str]) -> list[str]:
    """Every problem with ``config`` for these ``sites`` that shows without loading the data.

    Checks the site names, that the user's files exist (and a MedMNIST archive has its six
    arrays, an image folder's labels CSVs are well formed and list existing files), that a
    by-folder split has one sub-folder per site, and that there are enough samples for the sites
    where that is known without loading. An empty list means :func:`load_task` can proceed.
    """
    problems = _sites_problems(sites)
    sites_ok = not problems
    if config.kind in SYNTHETIC_KINDS:
        problems += synthetic_problems(config)
    if config.kind is DataKind.MEDMNIST:
        problems += medmnist_problems(config)
    elif config.kind is DataKind.IMAGE_FOLDER:
        if sites_ok:
            problems += folder_problems(config, sites=list(sites))
    elif sites_ok:
        problems += _embedded_size_problems(config, len(list(sites)))
    return problems


def _load_source(config: DataConfig, sites: Sequence[str], seed: int) -> Source:
    if config.kind is DataKind.BREAST_CANCER:
        return load_breast_cancer()
    if config.kind in SYNTHETIC_KINDS:
        return load_synthetic(config, seed=seed)
    if config.kind is DataKind.MEDMNIST:
        return load_medmnist(config)
    return load_image_folder(config, sites=sites)


def _standardised(data: ArrayDataset, train: np.ndarray) -> ArrayDataset:
    """``data`` with every feature standardised by the mean and deviation of the ``train`` rows."""
    rows = data.inputs[train]
    mean = rows.mean(axis=0)
    scale = rows.std(axis=0)
    scale[scale == 0] = 1  # a constant feature stays constant (zero) instead of dividing by 0
    return ArrayDataset(inputs=(data.inputs - mean) / scale, targets=data.targets)


def load_task(config: DataConfig, *, sites: Sequence[str], seed: int) -> FederatedTask:
    """Load the data of ``config`` and share it out among ``sites`` (names, in order).

    Returns the task with one :class:`SiteData` per site (train and validation splits) and the
    global test set, deterministic given ``seed``. Raises :class:`ConfigError` listing every
    problem: missing or malformed files, too few samples for the sites, a split that does not
    apply, a bad seed.
    """
    problems = []
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        problems.append(f"seed must be an int >= 0, got {seed!r}")
    problems += data_problems(config, sites=sites)
    if problems:
        raise ConfigError(problems)
    names = list(sites)
    source = _load_source(config, names, int(seed))
    hint = ", or add images" if config.kind is DataKind.IMAGE_FOLDER else ""
    parts = partition(size=len(source.data), labels=source.labels, split=config.split,
                      num_sites=len(names), alpha=config.alpha, val_fraction=config.val_fraction,
                      test_fraction=None if source.test is not None else config.test_fraction,
                      rng=np.random.default_rng([int(seed), _SPLIT_STREAM]), groups=source.groups,
                      what=f"{source.name!r}", hint=hint)
    data = source.data
    bad = [what for what, part in (("the data", data), ("the test split", source.test))
           if part is not None and not np.isfinite(part.inputs).all()]
    if bad:
        raise ConfigError(f"{' and '.join(bad)} of {source.name!r} hold NaN or infinite values; clean or drop "
                          "those records (training on them would spend privacy budget and learn nothing)")
    if source.standardise:
        data = _standardised(data, np.concatenate([train for train, _ in parts.sites]))
    test = source.test if source.test is not None else data.subset(parts.test)
    site_data = tuple(SiteData(name=name, train=data.subset(train), val=data.subset(val))
                      for name, (train, val) in zip(names, parts.sites))
    return FederatedTask(name=source.name, spec=source.spec, sites=site_data, test=test,
                         description=source.description)
