"""What a run produces: per-round records, the run directory's files and the returned result.

```
<run_dir>/
  run.json                    the config the run started with (``--resume`` reads it)
  roster.json                 every site's public identity
  summary.json                rounds, each site's epsilon and delta, final metrics (the CLI's --json)
  metrics.jsonl               one line per completed round
  model.pt                    the final global model (a torch state_dict; load with weights_only=True)
  coordinator_transcript.json what the coordinator received and sent, by message kind
  checkpoints/                the newest consistent checkpoint (and the one before)
  sites/<name>/               each site's workspace: keys, ledger, ledger head, state, own metrics
                              (under "he" also its CKKS key and the global model it holds)
  he/                         under "he": the public context and sealed keys, sums not yet
                              acknowledged by every site (securefed.federation.runtime_he)
```
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from securefed.federation.setup import site_workspace
from securefed.federation.transport import Transcript
from securefed.primitives._files import write_atomic

__all__ = ["RoundRecord", "FederationResult", "SiteSummary", "write_run_outputs", "transcript_summary"]


@dataclass(frozen=True)
class RoundRecord:
    round: int
    # the global model on the global test set: {} when not evaluated this round, None while pending
    metrics: dict[str, float] | None
    cohort: tuple[str, ...]
    survivors: tuple[str, ...]
    refusals: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failure: str | None = None
    seconds: float = 0.0
    bytes_received: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "metrics": self.metrics, "cohort": list(self.cohort),
                "survivors": list(self.survivors), "dropped": list(self.dropped),
                "refusals": self.refusals, "rejected": self.rejected, "failure": self.failure,
                "seconds": round(self.seconds, 3), "bytes_received": self.bytes_received}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        return cls(round=data["round"], metrics=data["metrics"], cohort=tuple(data["cohort"]),
                   survivors=tuple(data["survivors"]), refusals=data.get("refusals", {}),
                   rejected=data.get("rejected", {}), failure=data.get("failure"),
                   seconds=data.get("seconds", 0.0), bytes_received=data.get("bytes_received", 0))

    @property
    def dropped(self) -> tuple[str, ...]:
        """Sites of the cohort whose updates are not in the sum."""
        return tuple(s for s in self.cohort if s not in self.survivors)

    def status_line(self) -> str:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in (self.metrics or {}).items())
        status = f"round {self.round}: {len(self.survivors)}/{len(self.cohort)} sites"
        if self.failure:
            status += f", failed ({self.failure[:60]})"
        return status + (f", {shown}" if shown else "")


@dataclass(frozen=True)
class SiteSummary:
    epsilon: float | None  # spent over the run (None without DP)
    delta: float | None
    budget_epsilon: float | None
    ledger_id: str | None
    rounds_trained: int
    validation: dict[str, float]  # the site's own evaluation of the final model on its held-out split
    train_records: int = 0  # the size of the site's training split
    validation_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "budget_epsilon": self.budget_epsilon,
                "ledger_id": self.ledger_id, "rounds_trained": self.rounds_trained, "validation": self.validation,
                "train_records": self.train_records, "validation_records": self.validation_records}


@dataclass(frozen=True, eq=False)
class FederationResult:
    run_dir: Path
    rounds: list[RoundRecord]
    sites: dict[str, SiteSummary]
    final_metrics: dict[str, float]
    model: np.ndarray  # the final global model, flat float32
    transcript: dict[str, Any]
    summary: dict[str, Any]  # what summary.json holds
    coordinator_transcript: Transcript | None = None  # every message the coordinator sent and received

    def epsilon(self, site: str) -> float | None:
        """What ``site`` spent over the run (None without DP)."""
        return self.sites[site].epsilon


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a metric (a diverged model) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def transcript_summary(transcript: Transcript) -> dict[str, Any]:
    """Counts and bytes of every kind of message the coordinator received and sent."""
    received: Counter[str] = Counter()
    received_bytes: Counter[str] = Counter()
    for entry in transcript.received():
        received[entry.kind] += 1
        received_bytes[entry.kind] += entry.nbytes
    plaintext = received.get("PlainUpdate", 0)
    return {"bytes_received": transcript.bytes_received, "bytes_sent": transcript.bytes_sent,
            "plaintext_updates_received": plaintext,
            "messages_received": sum(1 for _ in transcript.received()),
            "received_by_kind": {k: {"messages": received[k], "bytes": received_bytes[k]} for k in sorted(received)}}


def _site_summary(run_dir: Path, site: Any) -> SiteSummary:
    """A site's spend (read from its ledger, verified under its key), records and own validation."""
    from securefed.primitives.keys import SiteIdentity
    from securefed.privacy.ledger import PrivacyLedger

    workspace = site_workspace(run_dir, site.name)
    rows = workspace.metrics()
    common = {"rounds_trained": len(workspace.load_state().trained),
              "validation": max(rows, key=lambda r: r["round"])["metrics"] if rows else {},
              "train_records": len(site.train), "validation_records": len(site.val)}
    if not workspace.ledger_file.exists():
        return SiteSummary(None, None, None, None, **common)
    public = SiteIdentity.load(workspace.identity_file).public()
    with PrivacyLedger.read(workspace.ledger_file, public_key=public) as ledger:
        spent = ledger.spent()
        return SiteSummary(float(spent.epsilon), float(spent.delta), float(ledger.budget.epsilon), ledger.ledger_id,
                           **common)


def write_run_outputs(*, run_dir: Path, config: Any, task: Any, state: Any, evaluator: Any,
                      transcript: Transcript, seconds: float) -> FederationResult:
    """Write summary.json, metrics.jsonl, the final model and the transcript summary; return the result."""
    rounds = [RoundRecord.from_dict(r) for r in state.history]
    final_metrics = next((r.metrics for r in reversed(rounds) if r.metrics), {})
    sites = {site.name: _site_summary(run_dir, site) for site in task.sites}
    evaluator.save(state.model, run_dir / "model.pt")
    lines = "".join(json.dumps(_finite(r.to_dict()), allow_nan=False) + "\n" for r in rounds)
    write_atomic(run_dir / "metrics.jsonl", lines.encode(), mode=0o644, overwrite=True)
    traffic = transcript_summary(transcript)
    write_atomic(run_dir / "coordinator_transcript.json", json.dumps(traffic, indent=1).encode(), mode=0o644,
                 overwrite=True)
    summary = _finite({
        "run_dir": str(run_dir),
        "task": task.description,
        "aggregation": config.federation.aggregation.value,
        "parameters": int(state.model.size),
        "rounds": [{"round": r.round, "metrics": r.metrics, "survivors": list(r.survivors),
                    "dropped": list(r.dropped), "failure": r.failure} for r in rounds],
        "sites": {name: s.to_dict() for name, s in sites.items()},
        "final_metrics": final_metrics,
        "seconds": round(seconds, 2),
        "coordinator": traffic,
    })
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, allow_nan=False).encode(), mode=0o644, overwrite=True)
    return FederationResult(run_dir=run_dir, rounds=rounds, sites=sites, final_metrics=final_metrics,
                            model=state.model, transcript=traffic, summary=summary,
                            coordinator_transcript=transcript)
