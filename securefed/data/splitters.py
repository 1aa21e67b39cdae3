"""Sharing pooled samples out among sites: IID, Dirichlet label skew, by folder (indices only).

Everything here works on sample indices and draws from one ``numpy.random.Generator``, so a
partition is a pure function of the labels, the settings and the seed.

- **Global test set**: ``test_fraction`` of the pooled samples (at least ``MIN_PER_SPLIT``),
  stratified by label when there are labels; by folder, that fraction of every folder.
- **IID**: a shuffle cut into near-equal parts (sizes differ by at most one).
- **Dirichlet label skew** (Hsu, Qi and Brown 2019): for each class, site shares are drawn from
  Dir(alpha, ..., alpha) and the class's samples are cut accordingly; small alpha gives each site
  a few dominant classes, large alpha approaches IID. Every site must end with at least
  ``MIN_SITE_SAMPLES``: a draw that leaves a site short is redrawn (up to ``DIRICHLET_ATTEMPTS``
  times); if every draw fails, the last one is topped up by moving random samples, one at a time,
  from the currently largest site to each short site. Both steps use the same generator, so the
  result is still deterministic.
- **Per-site validation**: ``val_fraction`` of each site (at least ``MIN_PER_SPLIT``, leaving at
  least ``MIN_PER_SPLIT`` to train on), stratified by label where there are labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .types import SplitKind

__all__ = [
    "MIN_PER_SPLIT",
    "MIN_SITE_SAMPLES",
    "DIRICHLET_ATTEMPTS",
    "Partition",
    "holdout_count",
    "samples_needed",
    "max_sites",
    "size_problems",
    "group_size_problems",
    "stratified_holdout",
    "split_iid",
    "split_dirichlet",
    "split_train_val",
    "partition",
]

MIN_PER_SPLIT = 2
MIN_SITE_SAMPLES = 2 * MIN_PER_SPLIT  # a training and a validation split of MIN_PER_SPLIT each
DIRICHLET_ATTEMPTS = 100


@dataclass(frozen=True, eq=False)
class Partition:
    """Indices into the pooled samples: the global test set and each site's (train, val)."""

    test: np.ndarray
    sites: tuple[tuple[np.ndarray, np.ndarray], ...]


def holdout_count(n: int, fraction: float) -> int:
    """How many of ``n`` samples a ``fraction`` hold-out takes (at least ``MIN_PER_SPLIT``)."""
    return min(n, max(MIN_PER_SPLIT, int(round(fraction * n))))


def samples_needed(num_sites: int, test_fraction: float | None) -> int:
    """The fewest pooled samples that give ``num_sites`` sites ``MIN_SITE_SAMPLES`` each after the
    test hold-out (``test_fraction`` None: the source brings its own test set)."""
    n = num_sites * MIN_SITE_SAMPLES
    while test_fraction is not None and n - holdout_count(n, test_fraction) < num_sites * MIN_SITE_SAMPLES:
        n += 1
    return n


def max_sites(n: int, test_fraction: float | None) -> int:
    """The most sites ``n`` pooled samples can supply (0 if not even one)."""
    rest = n - (holdout_count(n, test_fraction) if test_fraction is not None else 0)
    return max(0, rest // MIN_SITE_SAMPLES)


def size_problems(size: int, num_sites: int, test_fraction: float | None, *, what: str,
                  hint: str = "") -> list[str]:
    """A problem if ``size`` pooled samples cannot supply ``num_sites`` sites (empty list if they can)."""
    need = samples_needed(num_sites, test_fraction)
    if size >= need:
        return []
    most = max_sites(size, test_fraction)
    return [f"{what} has {size} samples, but {num_sites} sites need at least {need} "
            f"({MIN_PER_SPLIT} training + {MIN_PER_SPLIT} validation samples per site"
            f"{', plus the test set' if test_fraction is not None else ''}): use at most {most} "
            f"site{'s' if most != 1 else ''}{hint}"]


def group_size_problems(sizes: Sequence[tuple[str, int]], test_fraction: float | None, *,
                        what: str) -> list[str]:
    """A problem naming every folder too small to be a site of its own (by-folder split)."""
    need = samples_needed(1, test_fraction)
    short = [f"{name!r} has {n}" for name, n in sizes if n < need]
    if not short:
        return []
    return [f"with split 'by-folder' every folder of {what} needs at least {need} samples (its test "
            f"share, then {MIN_PER_SPLIT} training + {MIN_PER_SPLIT} validation); {', '.join(short)}: "
            "add images to those folders"]


def _sorted(indices: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(indices, dtype=np.int64))


def stratified_holdout(indices: np.ndarray, labels: np.ndarray | None, count: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, held) with ``count`` held out, in class proportions.

    Each class gets the floor of its proportional share and the leftover places go to the classes
    with the largest remainders (ties broken at random). ``labels`` (aligned with ``indices``)
    None means no classes: a plain random draw.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if not 0 <= count <= len(indices):
        raise ValueError(f"cannot hold out {count} of {len(indices)} samples")
    if labels is None:
        order = rng.permutation(indices)
        return _sorted(order[count:]), _sorted(order[:count])
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    scaled = count * counts
    quota = scaled // len(indices)
    leftover = int(count - quota.sum())
    # largest remainder first; a random key breaks ties without favouring low class ids
    order = np.lexsort((rng.random(len(classes)), -(scaled % len(indices))))
    quota[order[:leftover]] += 1
    held = [rng.permutation(indices[labels == c])[:q] for c, q in zip(classes, quota)]
    held_idx = np.concatenate(held) if held else np.empty(0, np.int64)
    return _sorted(np.setdiff1d(indices, held_idx)), _sorted(held_idx)


def split_iid(indices: np.ndarray, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``indices`` and cut them into ``num_sites`` parts whose sizes differ by at most one."""
    return [_sorted(part) for part in np.array_split(rng.permutation(np.asarray(indices)), num_sites)]


def split_dirichlet(indices: np.ndarray, labels: np.ndarray, num_sites: int, alpha: float,
                    rng: np.random.Generator, *, min_size: int = MIN_SITE_SAMPLES) -> list[np.ndarray]:
    """Share ``indices`` out with Dirichlet(``alpha``) label skew; every site gets >= ``min_size``."""
    indices, labels = np.asarray(indices, dtype=np.int64), np.asarray(labels)
    if len(indices) < num_sites * min_size:
        raise ValueError(f"{len(indices)} samples cannot give {num_sites} sites {min_size} each")
    classes = np.unique(labels)
    parts: list[list[int]] = []
    for _ in range(DIRICHLET_ATTEMPTS):
        parts = [[] for _ in range(num_sites)]
        for c in classes:
            members = rng.permutation(indices[labels == c])
            shares = rng.dirichlet(np.full(num_sites, float(alpha)))
            if not np.all(np.isfinite(shares)):  # extreme alpha underflow: all to one site
                shares = np.eye(num_sites)[rng.integers(num_sites)]
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [_sorted(np.array(p, dtype=np.int64)) for p in parts]
    return [_sorted(np.array(p, dtype=np.int64)) for p in _top_up(parts, min_size, rng)]


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> list[list[int]]:
    while True:
        sizes = [len(p) for p in parts]
        short = next((i for i, s in enumerate(sizes) if s < min_size), None)
        if short is None:
            return parts
        donor = int(np.argmax(sizes))
        moved = parts[donor].pop(int(rng.integers(len(parts[donor]))))
        parts[short].append(moved)


def split_train_val(indices: np.ndarray, labels: np.ndarray | None, val_fraction: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A site's (train, val): ``val_fraction`` held out, at least ``MIN_PER_SPLIT`` in each."""
    n = len(indices)
    count = min(max(MIN_PER_SPLIT, int(round(val_fraction * n))), n - MIN_PER_SPLIT)
    if count < MIN_PER_SPLIT:
        raise ValueError(f"a site with {n} samples cannot hold {MIN_PER_SPLIT} for training and validation")
    return stratified_holdout(indices, labels, count, rng)


def partition(*, size: int, labels: np.ndarray | None, split: SplitKind, num_sites: int,
              alpha: float, val_fraction: float, test_fraction: float | None,
              rng: np.random.Generator, groups: Sequence[tuple[str, np.ndarray]] | None = None,
              what: str = "the data", hint: str = "") -> Partition:
    """Split ``size`` pooled samples into a global test set and ``num_sites`` (train, val) pairs.

    ``labels`` (class ids, or None for segmentation) stratify the hold-outs and drive the
    Dirichlet skew. ``test_fraction`` None means the source brings its own test set. By folder,
    ``groups`` holds each site's (folder name, sample indices), in site order. Too few samples raise
    :class:`ConfigError` naming ``what``, how many are needed and ``hint`` (how to get more).
    """
    all_idx = np.arange(size, dtype=np.int64)
    label_of = (lambda idx: None) if labels is None else (lambda idx: np.asarray(labels)[idx])
    if split is SplitKind.BY_FOLDER:
        if groups is None or len(groups) != num_sites:
            raise ValueError("split by folder needs one group of indices per site")
        return _partition_groups(groups, label_of, val_fraction, test_fraction, rng, what)
    problems = size_problems(size, num_sites, test_fraction, what=what, hint=hint)
    if problems:
        raise ConfigError(problems)
    if test_fraction is None:
        pool, test = all_idx, np.empty(0, np.int64)
    else:
        pool, test = stratified_holdout(all_idx, label_of(all_idx), holdout_count(size, test_fraction), rng)
    if split is SplitKind.DIRICHLET:
        if labels is None:
            raise ConfigError(f"split 'dirichlet' needs class labels, which {what} does not have: use split 'iid'")
        shares = split_dirichlet(pool, label_of(pool), num_sites, alpha, rng)
    else:
        shares = split_iid(pool, num_sites, rng)
    sites = tuple(split_train_val(share, label_of(share), val_fraction, rng) for share in shares)
    return Partition(test=test, sites=sites)


def _partition_groups(groups: Sequence[tuple[str, np.ndarray]], label_of, val_fraction: float,
                      test_fraction: float | None, rng: np.random.Generator, what: str) -> Partition:
    problems = group_size_problems([(name, len(g)) for name, g in groups], test_fraction, what=what)
    if problems:
        raise ConfigError(problems)
    tests, sites = [], []
    for _, members in groups:
        group = np.asarray(members, dtype=np.int64)
        if test_fraction is None:
            pool, test = group, np.empty(0, np.int64)
        else:
            pool, test = stratified_holdout(group, label_of(group), holdout_count(len(group), test_fraction), rng)
        tests.append(test)
        sites.append(split_train_val(pool, label_of(pool), val_fraction, rng))
    return Partition(test=_sorted(np.concatenate(tests)), sites=tuple(sites))
