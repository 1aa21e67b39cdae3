"""The embedded runtime's side of ``aggregation = "he"``: keys at the start, rounds, catching up,
and the researcher's copy of the model.

At the start of a run (and again on resume) the coordinator gets the run's key from the dealer
site, or reads the public part it kept in ``<run_dir>/he/``, hands every site its sealed copy and
the public initial model. A round's encrypted sum is written to ``he/sums/`` before it is sent to
the sites, with the majority's signed confirmation once it has one, so a run killed in between
finishes that round on resume instead of training it again (sites apply a sum once). Sums stay
until every site acknowledged them and a checkpoint holds their round: before each round, and
when the run ends, a site that missed one (or whose acknowledgement was lost, or that missed its
key or the initial model) is sent what it lacks, in order. A site more than ``KEEP_SUMS`` rounds
behind stays out, reported in each round's record.

The global model is held by the sites; the run directory's copy (for the global test set,
checkpoints and ``model.pt``) is read from the workspace of a site whose update was in the sum,
as the researcher of a site would: nothing in the coordinator's hands is ever decrypted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from securefed.errors import ProtocolAbort
from securefed.federation.coordinator import Coordinator, RoundOutcome
from securefed.federation.coordinator_he import HECoordinator, HEKeys, request_keys
from securefed.federation.messages import EncryptedAggregate, SumConfirmation, decode_federation_message
from securefed.federation.setup import site_workspace
from securefed.federation.site_he import load_held_model
from securefed.federation.site_level import SiteLevelDP
from securefed.federation.transport import Transport
from securefed.primitives._files import write_atomic
from securefed.primitives.keys import Roster

__all__ = ["HERun", "KEEP_SUMS"]

KEEP_SUMS = 5  # rounds of sums kept for sites that fell behind


class HERun:
    def __init__(self, *, config: Any, run_dir: Path, transport: Transport, roster: Roster, names: list[str]) -> None:
        self.config, self.run_dir, self.names = config, run_dir, names
        self.folder = run_dir / "he"
        (self.folder / "sums").mkdir(parents=True, exist_ok=True)
        keys_file = self.folder / "keys.bin"
        if keys_file.exists():
            keys = HEKeys.decode(keys_file.read_bytes())
        else:
            keys = request_keys(transport, roster=roster, dealer=config.he.dealer_of(names))
            write_atomic(keys_file, keys.encode(), mode=0o644, overwrite=False)
        self.coordinator = HECoordinator(roster=roster, transport=transport, config=config.he_config(), keys=keys,
                                         min_sites=config.he.min_sites)
        self._initial: np.ndarray | None = None
        self._plain: Coordinator | None = None

    def start(self, plain: Coordinator, initial_model: np.ndarray) -> None:
        """Deliver the key and the public initial model to every site that lacks them."""
        self._plain, self._initial = plain, initial_model
        self._join(self.names)

    def _join(self, sites: list[str]) -> dict[str, str]:
        """Key and initial model for ``sites`` (a site keeps what it already holds)."""
        if not sites:
            return {}
        problems = self.coordinator.deliver_keys(sites)
        ready = [s for s in sites if s not in problems]
        assert self._plain is not None and self._initial is not None
        acknowledged = self._plain.release(round_=0, model=self._initial, sites=ready) if ready else set()
        acks = self._acks()
        for site in ready:
            if site in acknowledged:
                acks.setdefault(site, 0)
            else:
                problems[site] = "it did not acknowledge the initial model"
        self._save_acks(acks)
        return problems

    # ------------------------------------------------------------------ kept sums
    @staticmethod
    def model_round(history: list[dict[str, Any]]) -> int:
        """The last round whose sum the sites applied (0: none yet)."""
        return max((r["round"] for r in history if r.get("failure") is None), default=0)

    def _sum_file(self, round_: int, suffix: str = "bin") -> Path:
        return self.folder / "sums" / f"round-{round_:04d}.{suffix}"

    def _load(self, round_: int) -> tuple[EncryptedAggregate | None, SumConfirmation | None]:
        found: list[Any] = []
        for suffix, kind in (("bin", EncryptedAggregate), ("confirmed", SumConfirmation)):
            path = self._sum_file(round_, suffix)
            message = decode_federation_message(path.read_bytes()) if path.exists() else None
            if message is not None and (not isinstance(message, kind) or message.round != round_):
                raise ProtocolAbort(f"{path} is not round {round_}'s {kind.__name__}")
            found.append(message)
        return found[0], found[1]

    def _acks(self) -> dict[str, int]:
        """The last round each site acknowledged applying (0: the initial model; absent: none)."""
        path = self.folder / "acknowledged.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _save_acks(self, acks: dict[str, int]) -> None:
        write_atomic(self.folder / "acknowledged.json", json.dumps(acks, indent=1).encode(), mode=0o644, overwrite=True)

    def prune(self, completed_rounds: int) -> None:
        """Drop sums every site holds (or that are too old to keep) once a checkpoint has them."""
        acks = self._acks()
        oldest = min((acks.get(name, 0) for name in self.names), default=0)
        keep_from = min(max(oldest, completed_rounds - KEEP_SUMS), completed_rounds) + 1
        for path in (self.folder / "sums").glob("round-*"):
            if int(path.name.split(".")[0].split("-")[1]) < keep_from:
                path.unlink(missing_ok=True)

    def pending(self, completed_rounds: int) -> tuple[dict[str, Any], EncryptedAggregate] | None:
        """A round summed but not checkpointed when the run stopped: (its record, its sum)."""
        record_file = self.folder / "aggregate.json"
        if not record_file.exists():
            return None
        record = json.loads(record_file.read_text())
        if record["round"] != completed_rounds + 1:
            return None
        aggregate, _ = self._load(record["round"])
        return None if aggregate is None else (record, aggregate)

    def catch_up(self, history: list[dict[str, Any]]) -> dict[str, str]:
        """Send each site what it has not acknowledged, oldest first: its key and the initial
        model, then the confirmed sums. Return who is still behind and why."""
        behind = {site: f"it has no key or initial model: {why}"
                  for site, why in self._join([s for s in self.names if s not in self._acks()]).items()}
        applied = sorted(r["round"] for r in history if r.get("failure") is None)
        acks = self._acks()
        for name in self.names:
            if name not in acks:
                continue
            for round_ in (r for r in applied if r > acks[name]):
                aggregate, confirmation = self._load(round_)
                if aggregate is None or confirmation is None:
                    behind[name] = f"it holds no model after round {round_}, whose sum is no longer kept"
                    break
                problems, _ = self.coordinator.release(aggregate, [name], confirmation)
                if name in problems:
                    behind[name] = f"it holds no model after round {round_}: {problems[name]}"
                    break
                acks[name] = round_
        self._save_acks(acks)
        return behind

    # ------------------------------------------------------------------ a round
    def run_round(self, *, round_: int, protocol_round: int, cohort: list[str], history: list[dict[str, Any]],
                  model_size: int) -> RoundOutcome:
        site_dp = SiteLevelDP.from_config(self.config)
        if site_dp is not None:  # the sites send the noised encoding, padded to a power of two
            model_size = site_dp.encoder(dimension=model_size, cohort=self.config.cohort_size(),
                                         threshold=self.config.he.min_sites).padded_dimension
        return self.coordinator.run_round(round_=round_, protocol_round=protocol_round, cohort=cohort,
                                          model_round=self.model_round(history), model_size=model_size)

    def keep(self, record: dict[str, Any], aggregate: EncryptedAggregate) -> None:
        """Write the round's sum to disk before any site sees it."""
        write_atomic(self._sum_file(aggregate.round), aggregate.encode(), mode=0o644, overwrite=True)
        write_atomic(self.folder / "aggregate.json", json.dumps(record).encode(), mode=0o644, overwrite=True)

    def release(self, aggregate: EncryptedAggregate) -> tuple[np.ndarray | None, dict[str, str]]:
        """Send the sum to every site and confirm it; return the researcher's copy of the new
        model (None if no site applied it) and the sites that did not acknowledge it, with why."""
        _, confirmation = self._load(aggregate.round)  # a resumed release reuses its confirmation

        def keep(confirmed: SumConfirmation) -> None:
            write_atomic(self._sum_file(aggregate.round, "confirmed"), confirmed.encode(), mode=0o644, overwrite=True)

        problems, confirmation = self.coordinator.release(aggregate, self.names, confirmation, keep=keep)
        if confirmation is None:  # never confirmed, so no site decrypted it
            self._sum_file(aggregate.round).unlink(missing_ok=True)
            return None, problems
        acks = self._acks()
        acks.update({name: aggregate.round for name in self.names if name not in problems and name in acks})
        self._save_acks(acks)
        model = self._applied_copy(aggregate)
        if model is None:  # confirmed, so it must be applied before any other round: try once more
            problems, _ = self.coordinator.release(aggregate, self.names, confirmation)
            model = self._applied_copy(aggregate)
        if model is None:
            raise ProtocolAbort(f"round {aggregate.round}'s sum was confirmed but no site could apply it yet; "
                                "continue the run with --resume once the sites are reachable")
        return model, problems

    def _applied_copy(self, aggregate: EncryptedAggregate) -> np.ndarray | None:
        """The model after ``aggregate`` from a site that applied it (acknowledgements can be
        lost: the workspaces say who did), one whose update is in the sum if it can."""
        names = self.coordinator.roster.names
        for name in [names[i] for i in aggregate.survivors] + self.names:
            held = load_held_model(site_workspace(self.run_dir, name))
            if held is not None and held.round == aggregate.round:
                return held.vector
        return None
