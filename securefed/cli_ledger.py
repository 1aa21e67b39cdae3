"""``securefed ledger``: verify and show a site's privacy ledger, as an auditor would.

The trusted public key never comes from the ledger file itself (a key stored there proves
nothing): it comes from the federation roster (``--roster FILE --site NAME``) or from a public
identity file (``--public-key FILE``, the JSON of ``PublicIdentity.to_dict()``). ``--head FILE``
(the JSON of ``PrivacyLedger.head().to_dict()``, published by the site earlier) also detects
entries cut off the end; ``--ledger-id HEX`` detects another ledger of the same site swapped in.
"""

from __future__ import annotations

import argparse
import json

from securefed.errors import ConfigError
from securefed.primitives._files import read_text
from securefed.primitives.identity import PublicIdentity
from securefed.primitives.roster import Roster

__all__ = ["add_ledger_commands"]


def _json_file(path: str, what: str) -> object:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what} {path} is not JSON ({error.msg} at line {error.lineno})") from None


def _trusted_key(args: argparse.Namespace) -> PublicIdentity:
    problems = []
    if (args.public_key is None) == (args.roster is None):
        problems.append("give the site's public key with exactly one of --public-key FILE or --roster FILE --site NAME")
    if args.roster is not None and args.site is None:
        problems.append("--roster needs --site NAME: the site whose ledger this is")
    if problems:
        raise ConfigError(problems)
    if args.public_key is not None:
        return PublicIdentity.from_dict(_json_file(args.public_key, "public key file"))
    roster = Roster.load(args.roster)
    if args.site not in roster:
        raise ConfigError(f"site {args.site!r} is not in the roster {args.roster}; sites: {', '.join(roster.names)}")
    return roster[args.site]


def _expected_head(args: argparse.Namespace):
    """The head to expect: a head's JSON, or a site's published ``{"ledger_id", "head"}`` (whose id
    is then expected too, unless ``--ledger-id`` says otherwise)."""
    from securefed.privacy import LedgerHead

    if args.head is None:
        return None
    data = _json_file(args.head, "ledger head file")
    if isinstance(data, dict) and set(data) == {"ledger_id", "head"}:
        if args.ledger_id is None:
            args.ledger_id = data["ledger_id"]
        data = data["head"]
    return LedgerHead.from_dict(data)


def _cmd_verify(args: argparse.Namespace) -> int:
    from securefed.privacy import verify_ledger_file

    problems = verify_ledger_file(args.ledger, _trusted_key(args), expected_head=_expected_head(args),
                                  expected_ledger_id=args.ledger_id)
    if args.json:
        print(json.dumps({"ledger": args.ledger, "valid": not problems,
                          "problems": [{"kind": p.kind.value, "seq": p.seq, "message": p.message} for p in problems]},
                         indent=2))
    elif problems:
        print(f"{args.ledger}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem.message}")
    else:
        print(f"{args.ledger}: valid" + ("" if args.head else " (pass --head to also detect a cut-off tail)"))
    return 1 if problems else 0


def _describe(event) -> str:
    if event is None:
        return ""
    record = event.to_record()
    kind = record.pop("kind")
    return kind + " " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _cmd_show(args: argparse.Namespace) -> int:
    from securefed.privacy import PrivacyLedger

    with PrivacyLedger.read(args.ledger, public_key=_trusted_key(args), expected_head=_expected_head(args),
                            expected_ledger_id=args.ledger_id) as ledger:
        entries, spent, budget = ledger.entries(), ledger.spent(), ledger.budget
        if args.json:
            print(json.dumps({
                "ledger": args.ledger, "ledger_id": ledger.ledger_id, "site": ledger.site, "accountant": ledger.accountant.value,
                "budget": {"epsilon": budget.epsilon, "delta": budget.delta},
                "spent": {"epsilon": spent.epsilon, "delta": spent.delta},
                "entries": [{"seq": e.seq, "kind": e.kind.value, "round": e.round_id, "settles": e.settles,
                             "event": None if e.event is None else e.event.to_record(),
                             "epsilon_after": e.epsilon_after, "delta_after": e.delta_after,
                             "recorded_at": e.recorded_at, "note": e.note} for e in entries],
            }, indent=2))
            return 0
        print(f"site {ledger.site}: spent epsilon {spent.epsilon:.4g} of {budget.epsilon:g} at delta {budget.delta:g} "
              f"({ledger.accountant.value} accountant)")
        for e in entries:
            settles = f" (settles #{e.settles})" if e.settles is not None else ""
            print(f"#{e.seq:<4} {e.recorded_at}  {e.kind.value:<7} round {e.round_id or '-':<8} "
                  f"eps {e.epsilon_after:<9.4g} {_describe(e.event)}{settles}")
    return 0


def add_ledger_commands(sub: argparse._SubParsersAction) -> None:
    ledger = sub.add_parser("ledger", help="verify or show a site's privacy ledger")
    commands = ledger.add_subparsers(dest="ledger_command", required=True)
    for name, func, text in (("verify", _cmd_verify, "check the hash chain, signatures and every epsilon"),
                             ("show", _cmd_show, "verify, then list every entry and the spend")):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("ledger", help="the ledger's SQLite file")
        cmd.add_argument("--public-key", metavar="FILE", help="the site's public identity (JSON)")
        cmd.add_argument("--roster", metavar="FILE", help="the federation roster holding the site's public key")
        cmd.add_argument("--site", metavar="NAME", help="the site's name in the roster")
        cmd.add_argument("--head", metavar="FILE", help="a signed head the site published (JSON)")
        cmd.add_argument("--ledger-id", metavar="HEX", help="the ledger id the site published (detects a swapped file)")
        cmd.add_argument("--json", action="store_true", help="print JSON")
        cmd.set_defaults(func=func)
