"""The global model on the coordinator's side: its initial parameters, test metrics, the saved file.

The coordinator legitimately holds the combined model (that is what the federation releases), so
it evaluates it on the global test set and saves it; it never sees a site's model or data.
Torch is loaded here, on first use, and nowhere else in the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GlobalEvaluator"]


class GlobalEvaluator:
    def __init__(self, config: Any, task: Any) -> None:
        import torch

        from securefed.models import build_model

        self._torch = torch
        self.spec = task.spec
        self.model = build_model(config.model, task.spec, seed=config.federation.seed)
        self.device = _device(config.training.device)
        self.model.to(self.device)
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    def initial_vector(self) -> np.ndarray:
        with self._torch.no_grad():
            flat = self._torch.nn.utils.parameters_to_vector(self._params)
        return flat.detach().cpu().numpy().astype(np.float32)

    @property
    def parameter_count(self) -> int:
        return int(sum(p.numel() for p in self._params))

    def evaluate(self, vector: np.ndarray, data: Any) -> dict[str, float]:
        from securefed.federation.local_training import evaluate_model

        return evaluate_model(self.model, self.spec, vector, data, device=self.device)

    def save(self, vector: np.ndarray, path: Path) -> Path:
        """Save the model with ``vector`` as its parameters (a torch state_dict; load with weights_only=True)."""
        torch = self._torch
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.as_tensor(vector, device=self.device), self._params)
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, temporary)
        temporary.replace(path)
        return path


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
