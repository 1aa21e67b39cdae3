"""A site's workspace directory: its keys, ledger, protocol state and local metrics.

Everything a site must remember across a crash lives here and is written atomically (a reader sees
the old file or the new one, never a mix). The coordinator has no access to it.

```
<workspace>/
  identity.key        the site's private keys (mode 0600)
  seed.key            the site's secret seed for sampling, noise and masks (mode 0600)
  ledger.sqlite       the privacy ledger (hash-chained, signed)
  ledger-head.json    the ledger's signed head, published after every charge
  state.json          the last protocol round started and the model each round trained on
  metrics.jsonl       the site's own evaluation of each global model on its held-out split
```
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securefed.errors import ConfigError
from securefed.primitives._files import write_atomic

__all__ = ["SiteWorkspace", "SiteState"]

_STATE_FORMAT = "securefed-site-state"


@dataclass
class SiteState:
    """What a site must never forget: replay protection for the protocol and for its noise."""

    previous_protocol_round: int | None = None
    trained: dict[int, str] = field(default_factory=dict)  # round -> hex digest of its starting model
    # Rounds whose update left this site (masked or, for "plain", in the clear): never sent again.
    released: set[int] = field(default_factory=set)

    def to_json(self) -> str:
        return json.dumps({"format": _STATE_FORMAT, "version": 1,
                           "previous_protocol_round": self.previous_protocol_round,
                           "trained": {str(k): v for k, v in sorted(self.trained.items())},
                           "released": sorted(self.released)}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> SiteState:
        try:
            data = json.loads(text)
            if data.get("format") != _STATE_FORMAT:
                raise ValueError("not a site state file")
            previous = data["previous_protocol_round"]
            if previous is not None and (isinstance(previous, bool) or not isinstance(previous, int)):
                raise ValueError("bad previous_protocol_round")
            trained = {int(k): str(v) for k, v in data["trained"].items()}
            released = {int(r) for r in data["released"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{where} is not a valid site state file ({exc}); restore it from a backup "
                              "(deleting it would let old protocol rounds be replayed)") from None
        return cls(previous, trained, released)


class SiteWorkspace:
    """Paths and atomic reads/writes of one site's workspace."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    identity_file = property(lambda self: self.root / "identity.key")
    seed_file = property(lambda self: self.root / "seed.key")
    ledger_file = property(lambda self: self.root / "ledger.sqlite")
    head_file = property(lambda self: self.root / "ledger-head.json")
    state_file = property(lambda self: self.root / "state.json")
    metrics_file = property(lambda self: self.root / "metrics.jsonl")

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def secret_seed(self, *, create_from: bytes | None = None) -> bytes:
        """The site's secret seed: read it, or create it (from ``create_from`` or the OS)."""
        if self.seed_file.exists():
            seed = bytes.fromhex(self.seed_file.read_text().strip())
            if len(seed) != 32:
                raise ConfigError(f"{self.seed_file} must hold 32 bytes in hex")
            return seed
        seed = create_from if create_from is not None else secrets.token_bytes(32)
        write_atomic(self.seed_file, seed.hex().encode(), mode=0o600, overwrite=False)
        return seed

    def load_state(self) -> SiteState:
        if not self.state_file.exists():
            return SiteState()
        return SiteState.from_json(self.state_file.read_text(), self.state_file)

    def save_state(self, state: SiteState) -> None:
        write_atomic(self.state_file, state.to_json().encode(), mode=0o600, overwrite=True)

    def publish_head(self, head: dict[str, Any], ledger_id: str) -> None:
        data = json.dumps({"ledger_id": ledger_id, "head": head}, indent=1).encode()
        write_atomic(self.head_file, data, mode=0o644, overwrite=True)

    def record_metrics(self, round_: int, metrics: dict[str, float]) -> None:
        """Append this site's evaluation of the global model after ``round_`` (once per round)."""
        if any(r.get("round") == round_ for r in self.metrics()):
            return
        torn = self.metrics_file.exists() and not self.metrics_file.read_bytes().endswith(b"\n")
        with open(self.metrics_file, "a", encoding="utf-8") as out:
            out.write(("\n" if torn and self.metrics_file.stat().st_size else "")
                      + json.dumps({"round": round_, "metrics": metrics}) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        rows = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:  # a line cut short by a crash is dropped; the round is re-evaluated on resume
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows
