"""The ``securefed`` command.

Exit codes: 0 success, 2 bad configuration or input, 1 anything else. Errors are printed as one
clear line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from securefed.errors import ConfigError, ProtocolAbort, SecurefedError
from securefed.cli_he import add_he_commands
from securefed.cli_init import add_init_command
from securefed.cli_keys import add_keys_commands
from securefed.cli_ledger import add_ledger_commands
from securefed.cli_run import add_run_command

__all__ = ["main"]


def _parse_dropouts(items: Sequence[str]) -> dict[str, list[int]]:
    dropouts: dict[str, list[int]] = {}
    problems = []
    for item in items:
        stage, sep, sites = item.partition(":")
        if not sep or not sites:
            problems.append(f"--drop {item!r}: expected STAGE:SITE[,SITE...], e.g. masked_input:3")
            continue
        try:
            dropouts.setdefault(stage, []).extend(int(s) for s in sites.split(","))
        except ValueError:
            problems.append(f"--drop {item!r}: site indices must be integers")
    if problems:
        raise ConfigError(problems)
    return dropouts


def _neighbors(value: str) -> int | str | None:
    if value == "all":
        return None
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'auto' or an even integer, got {value!r}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from securefed.secagg import SecAggConfig, decode_message, secure_sum

    config = SecAggConfig(neighbors=args.neighbors, bit_width=args.bit_width)
    rng = np.random.default_rng(args.seed)
    # Stand-ins for model updates: small, centred values, one vector per simulated hospital.
    updates = rng.normal(0.0, 0.05, size=(args.sites, args.length))
    dropouts = _parse_dropouts(args.drop) if args.drop else (
        {"masked_input": [1], "unmask": [2]} if args.sites >= 6 else {}
    )
    result = secure_sum(updates, config, dropouts=dropouts, seed=args.seed)
    survivors = sorted(result.survivors)
    plain = updates[survivors].sum(axis=0)
    error = float(np.abs(result.total - plain).max())
    view = result.coordinator_view
    first_upload = next(m for m in view.messages if m.stage.value == "masked_input")
    summary = {
        "sites": args.sites,
        "length": args.length,
        "neighbors": result.config.neighbors,
        "threshold": result.config.threshold,
        "bit_width": result.config.bit_width,
        "scale": result.config.scale,
        "dropouts": dropouts,
        "survivors": survivors,
        "bytes_per_stage": view.bytes_per_stage,
        "upload_bytes_per_parameter": view.upload_bytes(first_upload.sender) / args.length,
        "max_abs_error": error,
        "error_bound": len(survivors) / result.config.scale,
        "recovered_sum_head": [round(float(v), 6) for v in result.total[:5]],
        "plain_sum_head": [round(float(v), 6) for v in plain[:5]],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    k = "complete graph" if result.config.neighbors is None else f"{result.config.neighbors}-regular graph"
    print(f"Secure aggregation among {args.sites} simulated hospitals ({args.length} parameters each)")
    print(f"  {k}, threshold {result.config.threshold}, Z_2^{result.config.bit_width}, scale 2^{int(np.log2(result.config.scale))}")
    if dropouts:
        print("  dropouts: " + ", ".join(f"site {s} at {st}" for st, ss in dropouts.items() for s in ss))
    print("\nWhat the coordinator received (bytes per stage):")
    for stage, nbytes in view.bytes_per_stage.items():
        print(f"  {stage:<18} {nbytes:>12,}")
    sender = first_upload.sender
    print(f"\nSite {sender}'s update, first values:        "
          + " ".join(f"{v:+.5f}" for v in updates[sender][:4]))
    values = decode_message(first_upload.data or b"").values  # type: ignore[union-attr]
    print("What the coordinator saw of it (masked):  " + " ".join(f"{int(v):>10}" for v in values[:4]))
    print(f"\nSurvivors whose updates are in the sum: {survivors}")
    print("Recovered sum, first values: " + " ".join(f"{v:+.5f}" for v in result.total[:4]))
    print("Plain sum,     first values: " + " ".join(f"{v:+.5f}" for v in plain[:4]))
    print(f"Max abs error {error:.2e} (bound {summary['error_bound']:.2e}); "
          f"upload {summary['upload_bytes_per_parameter']:.2f} bytes/parameter")
    return 0


def _cmd_attacks(args: argparse.Namespace) -> int:
    from securefed.secagg import attacks

    if args.list or not args.name:
        for name in attacks.names():
            print(f"{name:<30} {attacks.describe(name)}")
        return 0
    rng = np.random.default_rng(args.seed)
    vectors = rng.normal(0.0, 0.05, size=(args.sites, 16))
    outcome = attacks.run(args.name, vectors, seed=args.seed, enforce_checks=not args.trusting_clients)
    print(json.dumps({
        "attack": outcome.name,
        "refused": outcome.refused,
        "leaked": outcome.leaked,
        "leaked_sites": list(outcome.leaked_sites),
        "refusals": {str(k): v for k, v in outcome.refusals.items()},
    }, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="securefed", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_command(sub)

    demo = sub.add_parser("demo", help="secure aggregation among simulated hospitals, showing what the coordinator sees")
    demo.add_argument("--sites", type=int, default=8)
    demo.add_argument("--length", type=int, default=10_000, help="parameters per update")
    demo.add_argument("--neighbors", type=_neighbors, default=None, help="'all' (default), 'auto' or an even k")
    demo.add_argument("--bit-width", type=int, default=32, choices=(32, 64))
    demo.add_argument("--drop", action="append", default=[], metavar="STAGE:SITES",
                      help="sites that vanish at a stage, e.g. masked_input:1,3 (repeatable)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(func=_cmd_demo)

    attack = sub.add_parser("attacks", help="list or play scripted malicious-coordinator attacks")
    attack.add_argument("name", nargs="?")
    attack.add_argument("--list", action="store_true")
    attack.add_argument("--sites", type=int, default=8)
    attack.add_argument("--seed", type=int, default=0)
    attack.add_argument("--trusting-clients", action="store_true",
                        help="research only: clients that skip their checks, to see what the checks prevent")
    attack.set_defaults(func=_cmd_attacks)

    add_ledger_commands(sub)
    add_init_command(sub)
    add_keys_commands(sub)
    add_he_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"securefed: error: {exc}", file=sys.stderr)
        return 2
    except (ProtocolAbort, SecurefedError) as exc:
        if args.debug:
            raise
        print(f"securefed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        if args.debug:
            raise
        print(f"securefed: unexpected {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
