"""The embedded runtime's side of ``aggregation = "he"``: keys at the start, rounds, and the
researcher's copy of the model.

At the start of a run (and again on resume) the coordinator gets the run's key from the dealer
site, or reads the public part it kept in ``<run_dir>/he/``, hands every site its sealed copy and
the public initial model. A round's encrypted sum is written to ``he/sums/`` before it is sent to
the sites, so a run killed in between finishes that round on resume instead of training it again
(sites apply a sum once). Sums stay there until every site has acknowledged them: before each
round, a site that missed one (or whose acknowledgement was lost) is sent what it lacks, in order. The global model is held by the sites; the run directory's
copy (for the global test set, checkpoints and ``model.pt``) is read from a site's workspace, as
the researcher of a site would: nothing in the coordinator's hands is ever decrypted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from securefed.errors import ProtocolAbort
from securefed.federation.coordinator import Coordinator, RoundOutcome
from securefed.federation.coordinator_he import HECoordinator, HEKeys, request_keys
from securefed.federation.messages import EncryptedAggregate, decode_federation_message
from securefed.federation.setup import site_workspace
from securefed.federation.site_he import load_held_model
from securefed.federation.site_level import SiteLevelDP
from securefed.federation.transport import Transport
from securefed.primitives._files import write_atomic
from securefed.primitives.keys import Roster

__all__ = ["HERun"]


class HERun:
    def __init__(self, *, config: Any, run_dir: Path, transport: Transport, roster: Roster, names: list[str]) -> None:
        self.config, self.run_dir, self.names = config, run_dir, names
        self.folder = run_dir / "he"
        self.folder.mkdir(exist_ok=True)
        keys_file = self.folder / "keys.bin"
        if keys_file.exists():
            keys = HEKeys.decode(keys_file.read_bytes())
        else:
            keys = request_keys(transport, roster=roster, dealer=config.he.dealer_of(names))
            write_atomic(keys_file, keys.encode(), mode=0o644, overwrite=False)
        self.coordinator = HECoordinator(roster=roster, transport=transport, config=config.he_config(), keys=keys,
                                         min_sites=config.he.min_sites)
        self.key_problems = self.coordinator.deliver_keys(names)

    def start(self, plain: Coordinator, initial_model: np.ndarray) -> None:
        """Send the public initial model to every site (a site that holds a model keeps it)."""
        plain.release(round_=0, model=initial_model, sites=self.names)

    @staticmethod
    def model_round(history: list[dict[str, Any]]) -> int:
        """The last round whose sum the sites applied (0: none yet)."""
        done = [r["round"] for r in history if r.get("failure") is None]
        return max(done, default=0)

    def _sum_file(self, round_: int) -> Path:
        return self.folder / "sums" / f"round-{round_:04d}.bin"

    def _load_sum(self, round_: int) -> EncryptedAggregate | None:
        path = self._sum_file(round_)
        if not path.exists():
            return None
        aggregate = decode_federation_message(path.read_bytes())
        if not isinstance(aggregate, EncryptedAggregate) or aggregate.round != round_:
            raise ProtocolAbort(f"{path} is not round {round_}'s encrypted sum")
        return aggregate

    def _acks(self) -> dict[str, int]:
        """The last round each site acknowledged applying (0: only the initial model)."""
        path = self.folder / "acknowledged.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _save_acks(self, acks: dict[str, int]) -> None:
        write_atomic(self.folder / "acknowledged.json", json.dumps(acks, indent=1).encode(), mode=0o644, overwrite=True)
        oldest = min((acks.get(name, 0) for name in self.names), default=0)
        for path in (self.folder / "sums").glob("round-*.bin"):  # every site holds these rounds already
            if int(path.stem.split("-")[1]) <= oldest:
                path.unlink(missing_ok=True)

    def pending(self, completed_rounds: int) -> tuple[dict[str, Any], EncryptedAggregate] | None:
        """A round summed but perhaps not applied when the run stopped: (its record, its sum)."""
        record_file = self.folder / "aggregate.json"
        if not record_file.exists():
            return None
        record = json.loads(record_file.read_text())
        if record["round"] != completed_rounds + 1:
            return None
        aggregate = self._load_sum(record["round"])
        return None if aggregate is None else (record, aggregate)

    def catch_up(self, history: list[dict[str, Any]]) -> dict[str, str]:
        """Send each site the sums it has not acknowledged, oldest first; return who is still
        behind and why (a site that misses one sum would otherwise sit out every later round)."""
        applied = sorted(r["round"] for r in history if r.get("failure") is None)
        acks, behind = self._acks(), {}
        for name in self.names:
            for round_ in (r for r in applied if r > acks.get(name, 0)):
                aggregate = self._load_sum(round_)
                problem = "its sum is no longer kept" if aggregate is None else \
                    self.coordinator.release(aggregate, [name]).get(name)
                if problem is not None:
                    behind[name] = f"holds no model after round {round_}: {problem}"
                    break
                acks[name] = round_
        self._save_acks(acks)
        return behind

    def run_round(self, *, round_: int, protocol_round: int, cohort: list[str], history: list[dict[str, Any]],
                  model_size: int) -> RoundOutcome:
        site_dp = SiteLevelDP.from_config(self.config)
        if site_dp is not None:  # the sites send the noised encoding, padded to a power of two
            model_size = site_dp.encoder(dimension=model_size, cohort=self.config.cohort_size(),
                                         threshold=self.config.he.min_sites).padded_dimension
        return self.coordinator.run_round(round_=round_, protocol_round=protocol_round, cohort=cohort,
                                          model_round=self.model_round(history), model_size=model_size)

    def keep(self, record: dict[str, Any], aggregate: EncryptedAggregate) -> None:
        """Write the round's sum to disk before any site applies it."""
        self._sum_file(aggregate.round).parent.mkdir(exist_ok=True)
        write_atomic(self._sum_file(aggregate.round), aggregate.encode(), mode=0o644, overwrite=True)
        write_atomic(self.folder / "aggregate.json", json.dumps(record).encode(), mode=0o644, overwrite=True)

    def release(self, aggregate: EncryptedAggregate) -> tuple[np.ndarray | None, dict[str, str]]:
        """Send the sum to every site; return the researcher's copy of the new model (None if no
        site applied it) and the sites that did not acknowledge it, with why."""
        problems = self.coordinator.release(aggregate, self.names)
        acks = self._acks()
        acks.update({name: aggregate.round for name in self.names if name not in problems})
        model = None
        for name in self.names:  # acknowledgements can be lost: the workspaces say who applied it
            held = load_held_model(site_workspace(self.run_dir, name))
            if held is not None and held.round == aggregate.round:
                model = held.vector
                break
        if model is None:
            self._sum_file(aggregate.round).unlink(missing_ok=True)
        self._save_acks(acks)
        return model, problems
