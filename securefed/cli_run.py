"""``securefed run``: the main job, a federated training run from a config (or the built-in default).

Progress goes to stderr; the per-round table and each site's epsilon (or, with ``--json``, the
summary as JSON) go to stdout. ``--resume DIR`` continues a run that was stopped or killed, from
its last completed round, without charging any site twice for a round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from securefed.errors import ConfigError

__all__ = ["add_run_command"]


def _print_table(result: Any, config: Any, stream: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=stream, highlight=False)
    metric_names = sorted({k for r in result.rounds for k in r.metrics})
    rounds = Table(title=f"{config.federation.aggregation.value} federation: {result.summary['task']}")
    rounds.add_column("round", justify="right")
    for name in metric_names:
        rounds.add_column(name, justify="right")
    rounds.add_column("sites in sum", justify="right")
    rounds.add_column("notes")
    for r in result.rounds:
        note = r.failure or ", ".join(f"{s}: {why}" for s, why in {**r.refusals, **r.rejected}.items())
        rounds.add_row(str(r.round), *[f"{r.metrics[m]:.4f}" if m in r.metrics else "" for m in metric_names],
                       f"{len(r.survivors)}/{len(r.cohort)}", escape(note[:80]))
    console.print(rounds)
    sites = Table(title="each site: privacy spent over the run, data, its own validation of the final model")
    validation_names = sorted({k for s in result.sites.values() for k in s.validation if k != "loss"})
    for column in ("site", "epsilon", "delta", "budget", "rounds trained", "train / val records",
                   *[f"val {m}" for m in validation_names]):
        sites.add_column(column, justify="left" if column == "site" else "right")
    for name, s in result.sites.items():
        sites.add_row(name, "-" if s.epsilon is None else f"{s.epsilon:.3f}", "-" if s.delta is None else f"{s.delta:g}",
                      "-" if s.budget_epsilon is None else f"{s.budget_epsilon:g}", str(s.rounds_trained),
                      f"{s.train_records} / {s.validation_records}",
                      *[f"{s.validation[m]:.4f}" if m in s.validation else "" for m in validation_names])
    console.print(sites)
    final = ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items())
    console.print(f"final model on the global test set: {final}")
    console.print(f"run directory: {result.run_dir}  (summary.json, metrics.jsonl, model.pt, sites/*/ledger.sqlite)")


def _cmd_run(args: argparse.Namespace) -> int:
    from securefed.federation.config import default_config, load_config
    from securefed.federation.runtime import Federation

    if args.resume is not None:
        if args.config is not None:
            raise ConfigError("give either a CONFIG to start a run or --resume DIR to continue one, not both")
        federation = Federation.resume(args.resume)
    else:
        if args.config is None and Path("securefed.toml").is_file():
            print("securefed run: note: ./securefed.toml is not read without being named; running the built-in "
                  "default (use `securefed run securefed.toml` to run that file)", file=sys.stderr)
        config = load_config(args.config) if args.config is not None else default_config()
        federation = Federation(config, run_dir=args.run_dir)
    config = federation.config
    show_progress = not args.json and not args.quiet
    if show_progress:
        where = "the built-in default" if args.config is None and args.resume is None else (args.config or args.resume)
        print(f"securefed run: {len(config.site_names())} sites, {config.federation.rounds} rounds, "
              f"{config.federation.aggregation.value} aggregation ({where})", file=sys.stderr)
    try:
        result = federation.run(progress=show_progress)
    except KeyboardInterrupt:
        where = f"; continue it with `securefed run --resume {federation.run_dir}`" if federation.run_dir else ""
        print(f"securefed run: interrupted{where}", file=sys.stderr)
        return 130
    if args.json:
        json.dump(result.summary, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    elif not args.quiet:
        _print_table(result, config, sys.stdout)
    failed = [r for r in result.rounds if r.failure]
    if result.rounds and len(failed) == len(result.rounds):
        first = failed[0]
        reasons = "; ".join(f"{site}: {why}" for site, why in {**first.refusals, **first.rejected}.items())
        print(f"securefed run: no round produced an update (round {first.round}: {first.failure}"
              + (f"; the sites said: {reasons}" if reasons else "") + ")", file=sys.stderr)
        return 1
    return 0


def add_run_command(sub: Any) -> None:
    run = sub.add_parser("run", help="run federated training (the built-in default when no CONFIG is given)",
                         description=__doc__)
    run.add_argument("config", nargs="?", type=Path, help="a TOML config (see `securefed init`)")
    run.add_argument("--resume", metavar="DIR", type=Path, help="continue the run in DIR from its last completed round")
    run.add_argument("--run-dir", metavar="DIR", type=Path,
                     help="where to write the run (default: a new directory under ./runs)")
    run.add_argument("--json", action="store_true", help="print the run's summary as JSON on stdout")
    run.add_argument("--quiet", action="store_true", help="no progress and no table")
    run.set_defaults(func=_cmd_run)
