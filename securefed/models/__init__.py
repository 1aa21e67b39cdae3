"""The networks a federated task trains, built DP-SGD compatible and checked against the data.

- :class:`ModelConfig` (the ``[model]`` section), :data:`MODEL_NAMES` and :func:`model_problems`
  are torch-free (:mod:`.config`), so a configuration is checked before torch is loaded.
- :func:`build_model` (:mod:`.factory`, torch and MONAI) builds a built-in network (:mod:`.networks`:
  mlp, densenet121, unet, basicunet, segresnet) or a user factory's, seeded, DP-SGD compatible
  and shape-checked; it loads torch on first use.
"""

from __future__ import annotations

from securefed._lazy import lazy_exports

from .config import MODEL_NAMES, ModelConfig, ModelName, model_problems, resolved_name

__all__ = ["MODEL_NAMES", "ModelConfig", "ModelName", "model_problems", "resolved_name", "build_model"]

_LAZY = {"build_model": "factory"}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
