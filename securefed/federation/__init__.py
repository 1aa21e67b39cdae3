"""Federated training: sites, coordinator, the embedded runtime and its configuration.

A researcher describes hospitals, data, model and privacy once (a TOML file or Python objects),
and :class:`Federation` runs it: every site trains with DP-SGD and charges its own ledger, the
coordinator combines updates with secure aggregation and only ever holds the combined model.

```python
from securefed.federation import Federation, default_config
result = Federation(default_config(), run_dir="runs/demo").run(progress=True)
result.final_metrics, {name: s.epsilon for name, s in result.sites.items()}
```

- :mod:`.config` — the configuration (``load_config``, ``default_config``), validated at once.
- :mod:`.site`, :mod:`.coordinator` — the two kinds of party; they exchange only bytes.
- :mod:`.transport` — the one seam where messages cross (in process, worker processes, or a
  networked runtime).
- :mod:`.runtime` — :class:`Federation`: run directory, checkpoints after every round, resume.
- :mod:`.local_training` — the torch adapter: a site's local (DP-)SGD and evaluation.

Torch loads only when a run starts, so ``import securefed.federation`` stays light.
"""

from __future__ import annotations

from securefed._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Federation": "runtime",
    "FederationResult": "result",
    "RoundRecord": "result",
    "SiteSummary": "result",
    "FederationConfig": "config",
    "Aggregation": "config",
    "load_config": "config",
    "parse_config": "config",
    "default_config": "config",
    "validate": "config",
    "TrainingSettings": "training_settings",
    "Coordinator": "coordinator",
    "RoundOutcome": "coordinator",
    "FederationSite": "site",
    "SiteWorkspace": "workspace",
    "Transport": "transport",
    "InProcessTransport": "transport",
    "RecordingTransport": "transport",
    "FaultInjectingTransport": "transport",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
