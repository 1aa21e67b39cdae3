"""Poisson-sampled batches for DP-SGD, and where they go: the batch and device helpers.

The amplification-by-sampling analysis of DP-SGD (Abadi et al. 2016; Mironov, Talwar, Zhang 2019)
assumes every record joins every batch independently with probability q, so batch sizes vary and
a batch may be empty. An empty batch is still yielded: the step it drives adds noise only, and
skipping it would reveal that the batch was empty. Each round gets its own sampler with exactly
``steps`` batches, so the round's charge and the steps it runs agree by construction.

Under distributed training every process samples a disjoint shard of the records (rank r holds
records r, r + W, r + 2W, ...) at the same rate q, with its own generator: together one Poisson
sample of the whole dataset. The same generator on every rank would correlate the shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from opacus.data_loader import wrap_collate_with_empty
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from ..errors import ConfigError

__all__ = ["PoissonSampler", "PoissonData", "leading_size", "to_device", "as_pair", "resolve_device"]


class PoissonSampler(Sampler[list[int]]):
    """``steps`` batches of the indices of this process's shard, each kept with ``sample_rate``."""

    def __init__(self, *, dataset_size: int, sample_rate: float, steps: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1) -> None:
        self._shard = torch.arange(rank, dataset_size, world_size)
        self._rate, self._steps, self._generator = sample_rate, steps, generator

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self._steps):
            chosen = torch.rand(len(self._shard), generator=self._generator) < self._rate
            yield self._shard[chosen].tolist()


class PoissonData:
    """A map-style dataset and the loader settings to draw Poisson batches from it.

    From a DataLoader the collate function, workers, pinning and timeouts are kept; its batch
    size, sampler and shuffling are replaced. The collate function is wrapped (Opacus) so an
    empty batch keeps the structure of the earlier ones; the wrapper lives as long as this
    object, so later rounds remember that structure.
    """

    def __init__(self, data: object) -> None:
        if isinstance(data, DataLoader):
            options = {"num_workers": data.num_workers, "pin_memory": data.pin_memory, "timeout": data.timeout,
                       "worker_init_fn": data.worker_init_fn,
                       "multiprocessing_context": data.multiprocessing_context}
            if data.num_workers > 0:
                options["prefetch_factor"] = data.prefetch_factor
            dataset, collate = data.dataset, data.collate_fn
        else:
            dataset, options, collate = data, {}, None
        if (isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")
                or not hasattr(dataset, "__len__")):
            raise ConfigError(f"data must be a map-style Dataset (or a DataLoader over one) with __len__ and "
                              f"__getitem__: Poisson sampling needs random access, got {type(dataset).__name__}")
        self.dataset: Dataset = dataset
        self._options = options
        self._collate = wrap_collate_with_empty(collate_fn=collate or default_collate)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def loader(self, *, sample_rate: float, steps: int, generator: torch.Generator,
               rank: int = 0, world_size: int = 1) -> DataLoader:
        sampler = PoissonSampler(dataset_size=len(self), sample_rate=sample_rate, steps=steps,
                                 generator=generator, rank=rank, world_size=world_size)
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self._collate, **self._options)


def leading_size(batch: object) -> int:
    """The batch dimension of the first tensor in ``batch`` (0 when it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, Mapping):
        values: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return 0
    for value in values:
        if isinstance(value, torch.Tensor):
            return leading_size(value)
        size = leading_size(value)
        if size:
            return size
    return 0


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested in lists, tuples, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def as_pair(batch: Any) -> tuple[Any, Any]:
    """The default batch layout: an ``(inputs, targets)`` pair."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(f"a batch must be an (inputs, targets) pair, got {type(batch).__name__}; "
                      "pass unpack_batch= to train_round to say how to split it")


def resolve_device(spec: str, *, distributed: bool = False) -> torch.device:
    """``"auto"`` is CUDA when available (this process's GPU under torchrun), else the CPU."""
    available = torch.cuda.is_available()
    if spec == "auto":
        if not available:
            return torch.device("cpu")
        if not distributed:
            return torch.device("cuda", torch.cuda.current_device())
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"device='auto' under torchrun gives each process its own GPU, but LOCAL_RANK="
                              f"{local_rank} and only {torch.cuda.device_count()} GPUs exist: launch at most "
                              "one process per GPU, or use device='cpu'")
        return torch.device("cuda", local_rank)
    device = torch.device(spec)
    if device.type == "cuda":
        if not available:
            raise ConfigError(f"device={spec!r} but CUDA is not available here; use device='auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={spec!r} but only {torch.cuda.device_count()} CUDA devices exist")
    return device
