"""A federated round on CUDA (``[training] device = "cuda"``): sites train there, the global model
is evaluated there, and the round's results are finite. Skipped where CUDA is absent."""

from __future__ import annotations

import gc
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from securefed.federation import Federation, parse_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TASKS = {
    "breast-cancer-mlp": ({"kind": "breast-cancer"}, {"name": "mlp", "hidden": [16]}, "accuracy"),
    "seg2d-unet": ({"kind": "synthetic-seg2d", "samples": 32, "image_size": 32},
                   {"name": "unet", "features": [8, 16]}, "dice"),
}


def _devices_in_use() -> dict[str, set[str]]:
    """The devices of every site trainer and of the coordinator's evaluator alive in this process."""
    from securefed.federation.evaluation import GlobalEvaluator
    from securefed.federation.local_training import LocalTrainer

    seen: dict[str, set[str]] = {"trainers": set(), "trainer_parameters": set(), "evaluators": set()}
    for obj in gc.get_objects():
        kind = type(obj)
        if issubclass(kind, LocalTrainer):
            seen["trainers"].add(obj.device.type)
            seen["trainer_parameters"].update(p.device.type for p in obj.model.parameters())
        elif issubclass(kind, GlobalEvaluator):
            seen["evaluators"].add(obj.device.type)
    return seen


def federated_round(run_dir: Path, *, device: str, task: str) -> tuple[object, dict[str, set[str]]]:
    """One round of a 2-site federation on ``device``; the result and the devices seen mid-run."""
    data, model, _ = TASKS[task]
    config = parse_config({"federation": {"rounds": 1, "sites": 2, "seed": 0}, "data": data, "model": model,
                           "training": {"device": device, "batch_size": 8}})
    seen: dict[str, set[str]] = {}
    gc.collect()  # trainers of earlier runs (on other devices) must not be counted
    result = Federation(config, run_dir=run_dir).run(on_round=lambda record: seen.update(_devices_in_use()))
    return result, seen


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_federated_round_trains_and_evaluates_on_cuda(tmp_path, task):
    result, seen = federated_round(tmp_path / "run", device="cuda", task=task)
    metric = TASKS[task][2]
    record = result.rounds[0]
    assert record.failure is None and record.survivors == ("site-1", "site-2")
    assert seen == {"trainers": {"cuda"}, "trainer_parameters": {"cuda"}, "evaluators": {"cuda"}}
    assert 0.0 <= result.final_metrics[metric] <= 1.0 and math.isfinite(result.final_metrics["loss"])
    assert np.isfinite(result.model).all()
    for site in result.sites.values():
        assert 0 < site.epsilon <= 3.0 and all(math.isfinite(v) for v in site.validation.values())
