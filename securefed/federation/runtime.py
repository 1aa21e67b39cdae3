"""The embedded runtime: a whole federation in one process (or sites in worker processes).

:class:`Federation` turns a :class:`~securefed.federation.config.FederationConfig` into a run:
it loads the task, checks everything that can be checked before training (the model fits the
data, every site's budget covers at least one round), creates the run directory with one
workspace per site, and runs the rounds. The coordinator talks to the sites only through a
:class:`~securefed.federation.transport.Transport`. After every completed round the run directory
holds a consistent checkpoint; :meth:`Federation.resume` continues a killed run from it, and a
round that was cut short is replayed by every site from the same model under the charge it
already made, so no budget is charged twice for one round.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from securefed.errors import ConfigError, PrivacyError
from securefed.federation.checkpoint import RunState, load_checkpoint, next_attempt, save_checkpoint
from securefed.federation.coordinator import Coordinator, RoundOutcome
from securefed.federation.messages import message_kind
from securefed.federation.result import FederationResult, RoundRecord, write_run_outputs
from securefed.federation.site_level import SiteLevelDP
from securefed.federation.setup import SiteRecipe, build_site, federation_random, make_identities
from securefed.federation.transport import InProcessTransport, RecordingTransport, Transport
from securefed.primitives._files import write_atomic
from securefed.primitives.keys import Roster

__all__ = ["Federation", "MAX_ATTEMPTS"]

MAX_ATTEMPTS = 1000  # protocol round id = round * MAX_ATTEMPTS + attempt
_RUN_FILE = "run.json"


def _cohort(names: list[str], per_round: int, seed: int, round_: int) -> list[str]:
    if not per_round or per_round >= len(names):
        return list(names)
    rng = np.random.default_rng(int.from_bytes(federation_random(seed).fork(f"cohort/{round_}").random_bytes(8), "little"))
    return sorted(rng.choice(names, size=per_round, replace=False).tolist(), key=names.index)


class Federation:
    """A federated training run described by a config; ``run()`` trains and returns the result."""

    def __init__(self, config: Any, *, run_dir: str | os.PathLike[str] | None = None) -> None:
        from securefed.federation.config import FederationConfig, validate

        if not isinstance(config, FederationConfig):
            raise ConfigError(f"config must be a FederationConfig, got {type(config).__name__}")
        validate(config)
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._resuming = False
        self._he: Any = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, run_dir: str | os.PathLike[str] | None = None) -> Federation:
        from securefed.federation.config import load_config

        return cls(load_config(path), run_dir=run_dir)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike[str]) -> Federation:
        """The run in ``run_dir`` (its config as saved when it started), ready to continue."""
        from securefed.federation.config import parse_config

        where = Path(run_dir)
        if not (where / _RUN_FILE).is_file():
            raise ConfigError(f"{where} is not a securefed run directory (no {_RUN_FILE}); pass the directory "
                              "that `securefed run` printed")
        try:
            saved = json.loads((where / _RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where / _RUN_FILE} is unreadable ({exc})") from None
        federation = cls(parse_config(saved["config"], base_dir=where), run_dir=where)
        federation._resuming = True
        return federation

    # ------------------------------------------------------------------ running
    def run(self, *, progress: bool = False, on_round: Callable[[RoundRecord], None] | None = None,
            keep_transcript: bool = False) -> FederationResult:
        """Train every round (or the rounds left, when resuming) and write the run directory.

        ``progress`` shows a progress bar; ``on_round`` is called with each completed round's
        record; ``keep_transcript`` keeps every byte the coordinator received (for inspection).
        """
        from securefed.data import load_task

        config = self.config
        names = config.site_names()
        task = load_task(config.data, sites=names, seed=config.federation.seed)
        evaluator = self._preflight(task)
        run_dir = self._prepare_run_dir()
        attempt = next_attempt(run_dir, limit=MAX_ATTEMPTS)
        roster = make_identities(run_dir, names, config.federation.seed)
        Roster.save(roster, run_dir / "roster.json", overwrite=True)
        checkpoint = load_checkpoint(run_dir) if self._resuming else None
        state = checkpoint or RunState(0, evaluator.initial_vector(), [])
        transport, sites = self._transport(run_dir, task, roster)
        bar = _progress_bar(progress, total=config.federation.rounds, done=state.completed_rounds)
        recorder = RecordingTransport(transport, keep_payloads=keep_transcript, classify=message_kind)
        coordinator = Coordinator(roster=roster, transport=recorder if bar is None else _StageTransport(recorder, bar), aggregation=config.federation.aggregation.value,
                                  policy=config.secagg_config(), site_dp=SiteLevelDP.from_config(config))
        started = time.perf_counter()
        try:
            self._he = None
            if config.federation.aggregation.value == "he":
                state = self._start_he(coordinator, run_dir, roster, names, evaluator, state)
            state = self._evaluate_pending(run_dir, evaluator, task, state)
            for round_ in range(state.completed_rounds + 1, config.federation.rounds + 1):
                record, model = self._round(coordinator, recorder, task, state, round_, attempt, names)
                # The new model is on disk before anything else happens: a crash from here on
                # resumes with this round done instead of replaying it.
                state = RunState(round_, model, [*state.history, record.to_dict()])
                save_checkpoint(run_dir, state)
                if self._he is not None:
                    self._he.prune(round_)
                state = self._evaluate_pending(run_dir, evaluator, task, state)
                record = RoundRecord.from_dict(state.history[-1])
                if bar is not None:
                    bar.advance(record)
                if on_round is not None:
                    on_round(record)
            if self._he is None:
                coordinator.release(round_=state.completed_rounds, model=state.model, sites=names)
            else:  # the sites hold the model already; those that missed a sum get it now
                self._he.catch_up(state.history)
                self._he.prune(state.completed_rounds)
            if bar is not None and state.history:
                bar.status(RoundRecord.from_dict(state.history[-1]).status_line())
        finally:
            if bar is not None:
                bar.close()
            recorder.close()
            for site in sites:
                site.close()
            self._he = None
        return write_run_outputs(run_dir=run_dir, config=config, task=task, state=state, evaluator=evaluator,
                                 transcript=recorder.transcript, seconds=time.perf_counter() - started)

    def _evaluate_pending(self, run_dir: Path, evaluator: Any, task: Any, state: RunState) -> RunState:
        """Evaluate the last completed round if its checkpoint was saved before its evaluation."""
        if not state.history or state.history[-1].get("metrics") is not None:
            return state
        round_ = state.completed_rounds
        every = self.config.evaluation.every
        due = round_ % every == 0 or round_ == self.config.federation.rounds
        metrics = evaluator.evaluate(state.model, task.test) if due else {}
        state = RunState(round_, state.model, [*state.history[:-1], {**state.history[-1], "metrics": metrics}])
        save_checkpoint(run_dir, state)
        return state

    def _round(self, coordinator: Coordinator, recorder: RecordingTransport, task: Any,
               state: RunState, round_: int, attempt: int, names: list[str]) -> tuple[RoundRecord, np.ndarray]:
        config = self.config
        seed = config.federation.seed
        cohort = _cohort(names, config.federation.sites_per_round, seed, round_)
        before = recorder.transcript.bytes_received
        tick = time.perf_counter()
        protocol_round = round_ * MAX_ATTEMPTS + attempt
        behind: dict[str, str] = {}
        if self._he is not None:
            behind = self._he.catch_up(state.history)
            outcome: RoundOutcome = self._he.run_round(round_=round_, protocol_round=protocol_round, cohort=cohort,
                                                       history=state.history, model_size=state.model.size)
        else:
            outcome = coordinator.run_round(
                round_=round_, protocol_round=protocol_round, cohort=cohort, model=state.model,
                graph_seed=federation_random(seed).fork(f"graph/{round_}/{attempt}").random_bytes(32))
        model = state.model
        if outcome.mean_update is not None:
            model = (state.model + outcome.mean_update).astype(np.float32)
        record = RoundRecord(round=round_, metrics=None, cohort=outcome.cohort, survivors=outcome.survivors,
                             refusals={**{s: p for s, p in behind.items() if s not in outcome.survivors},
                                       **outcome.refusals}, rejected=outcome.rejected, failure=outcome.failure,
                             seconds=time.perf_counter() - tick,
                             bytes_received=recorder.transcript.bytes_received - before)
        if outcome.encrypted is not None:
            self._he.keep(record.to_dict(), outcome.encrypted)  # type: ignore[union-attr]
            return self._apply_he(record.to_dict(), outcome.encrypted, state.model)
        return record, model

    # ------------------------------------------------------------------ homomorphic encryption
    def _start_he(self, coordinator: Coordinator, run_dir: Path, roster: Roster, names: list[str],
                  evaluator: Any, state: RunState) -> RunState:
        """Keys to every site, the public initial model, and the end of a round cut short."""
        from securefed.federation.runtime_he import HERun

        self._he = HERun(config=self.config, run_dir=run_dir, transport=coordinator.transport, roster=roster,
                         names=names)
        self._he.start(coordinator, evaluator.initial_vector())
        pending = self._he.pending(state.completed_rounds)
        if pending is None:
            return state
        record, model = self._apply_he(*pending, state.model)
        state = RunState(record.round, model, [*state.history, record.to_dict()])
        save_checkpoint(run_dir, state)
        self._he.prune(state.completed_rounds)
        return state

    def _apply_he(self, record: dict[str, Any], aggregate: Any, previous: np.ndarray) -> tuple[RoundRecord, np.ndarray]:
        """Send a round's encrypted sum to the sites; the model is then a site's decrypted copy."""
        model, problems = self._he.release(aggregate)  # type: ignore[union-attr]
        if model is None:
            record = {**record, "failure": "no site applied the encrypted sum: "
                                           + "; ".join(f"{s}: {p}" for s, p in sorted(problems.items()))}
            return RoundRecord.from_dict(record), previous
        refusals = {**{s: f"did not acknowledge the sum: {p}" for s, p in problems.items()}, **record["refusals"]}
        return RoundRecord.from_dict({**record, "refusals": refusals}), model

    # ------------------------------------------------------------------ before any training
    def _preflight(self, task: Any) -> Any:
        """Checks that need the data: the model fits it and each budget covers one round."""
        from securefed.federation.evaluation import GlobalEvaluator

        config = self.config
        evaluator = GlobalEvaluator(config, task)  # builds the model: ConfigError if it does not fit
        problems: list[str] = []
        site_event = None
        site_dp = SiteLevelDP.from_config(config)
        if site_dp is not None:
            cohort = config.cohort_size()
            try:
                encoder = site_dp.encoder(dimension=evaluator.parameter_count, cohort=cohort,
                                          threshold=config.site_dp_threshold())
                site_event = encoder.event(sites=encoder.config.min_sites)
            except ConfigError as exc:
                problems.extend(f"[site_dp] {p}" for p in exc.problems)
        by_text: dict[str, list[str]] = {}  # the same problem at many sites is said once
        for site in task.sites:
            dp = config.privacy_for(site.name).dpsgd_config(config.training_for(site.name), config.federation.rounds)
            if dp is not None:
                for text in self._one_round_problems(site, dp, site_event):
                    by_text.setdefault(text, []).append(site.name)
        for text, names in by_text.items():
            listed = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"site{'s' if len(names) > 1 else ''} {listed}: {text}")
        if problems:
            raise ConfigError(problems)
        return evaluator

    def _one_round_problems(self, site: Any, dp: Any, site_event: Any) -> list[str]:
        from securefed.privacy.accounting import compose_epsilon
        from securefed.privacy.dpsgd_config import plan_training

        try:
            plan = plan_training(dp, dataset_size=len(site.train))
        except ConfigError as exc:
            return list(exc.problems)
        except PrivacyError as exc:
            return [f"[privacy] target_epsilon cannot be reached over {self.config.federation.rounds} rounds ({exc}); "
                    "raise target_epsilon, or train less per site: fewer rounds, a smaller batch_size or fewer "
                    "epochs_per_round"]
        events = [plan.round_event()] + ([site_event] if site_event is not None else [])
        try:
            one_round = compose_epsilon(events, delta=plan.delta, accountant=plan.accountant)
            if site_event is not None:  # the samplers' slack grows with rounds: the whole plan must fit delta
                compose_epsilon(events * self.config.federation.rounds, delta=plan.delta, accountant=plan.accountant)
        except PrivacyError as exc:
            return [f"the planned {self.config.federation.rounds} rounds cannot be accounted: {exc}"]
        budget = self.config.privacy_for(site.name).budget_for(self.config.site(site.name))
        if one_round <= budget.epsilon:
            return []
        what = f"{plan.steps_per_round} DP-SGD steps at noise {plan.noise_multiplier:.3g}"
        if site_event is not None:
            what += " plus the site-level noise"
        return [f"the budget of epsilon={budget.epsilon:g} cannot cover even one round "
                f"(one round of {what} costs epsilon={one_round:.3g}); raise the budget, or lower the cost per "
                "round (more noise, fewer steps_per_round or a smaller batch_size)"]

    def _prepare_run_dir(self) -> Path:
        from securefed.federation.config import config_to_dict

        if self._resuming:
            assert self.run_dir is not None
            return self.run_dir
        run_dir = self.run_dir
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"run-{stamp}-seed{self.config.federation.seed}"
            suffix = 1
            while run_dir.exists():
                suffix += 1
                run_dir = run_dir.with_name(f"run-{stamp}-seed{self.config.federation.seed}-{suffix}")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run directory {run_dir} already exists and is not empty; choose a new one, "
                              f"or continue that run with `securefed run --resume {run_dir}`")
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = {"format": "securefed-run", "version": 1, "config": config_to_dict(self.config)}
        write_atomic(run_dir / _RUN_FILE, json.dumps(saved, indent=1).encode(), mode=0o644, overwrite=False)
        self.run_dir = run_dir
        self._resuming = True  # from here on, running again continues this directory
        return run_dir

    def _transport(self, run_dir: Path, task: Any, roster: Roster) -> tuple[Transport, list[Any]]:
        config = self.config
        recipes = [SiteRecipe(config=config, name=name, run_dir=run_dir) for name in config.site_names()]
        if config.federation.workers:
            from securefed.federation.workers import WorkerProcessTransport

            transport = WorkerProcessTransport(recipes, roster=roster, workers=config.federation.workers)
            return transport, []
        sites = [build_site(recipe, task, roster) for recipe in recipes]
        return InProcessTransport({site.name: site for site in sites}), sites


class _Bar:
    def __init__(self, total: int, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from rich.console import Console

        self._progress = Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[status]}", markup=False),
                                  transient=False, console=Console(stderr=True))
        self._task = self._progress.add_task("rounds", total=total, completed=done, status="")
        self._progress.start()

    def advance(self, record: RoundRecord) -> None:
        self._progress.update(self._task, advance=1, status=record.status_line())

    def status(self, text: str) -> None:
        self._progress.update(self._task, status=text)

    def close(self) -> None:
        self._progress.stop()


# What the sites are doing while the coordinator waits for each kind of message it sent.
_STAGES = {
    "RoundStart": "sites training", "ProtocolRelay/KeyDirectory": "secure aggregation: sharing keys",
    "ProtocolRelay/ShareDelivery": "secure aggregation: masking updates",
    "ProtocolRelay/SurvivorList": "secure aggregation: consistency check",
    "ProtocolRelay/UnmaskRequest": "secure aggregation: unmasking", "ModelRelease": "sites evaluating the model",
    "KeyRequest": "HE: the dealer makes the key", "KeyDelivery": "HE: sites receive their sealed keys",
    "EncryptedAggregate": "HE: sites decrypt the sum",
}


class _StageTransport:
    """Shows on the progress bar what each exchange is waiting for (a round can take minutes)."""

    def __init__(self, inner: Transport, bar: _Bar) -> None:
        self.inner, self.bar = inner, bar

    def exchange(self, outgoing: Any) -> dict[str, bytes]:
        if outgoing:
            kind = message_kind(next(iter(outgoing.values())))
            self.bar.status(_STAGES.get(kind, kind))
        return self.inner.exchange(outgoing)

    def close(self) -> None:
        self.inner.close()


def _progress_bar(enabled: bool, *, total: int, done: int) -> _Bar | None:
    return _Bar(total, done) if enabled else None
