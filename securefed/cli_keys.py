"""``securefed keys``: create a site's identity, build the federation roster, show key files.

A site runs ``keys create NAME --out DIR`` once: it writes ``NAME.key`` (the private identity,
mode 0600, which never leaves the site) and ``NAME.public.json`` (its public identity). The
coordinator collects the public files and runs ``keys roster FILES... --out roster.json``; the
order of the files is the roster's order, which every party must share. ``keys show FILE``
prints a key or roster file's names and fingerprints, never private material, so two people can
compare fingerprints over the phone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from securefed.errors import ConfigError
from securefed.federation.config_sections import site_name_problems
from securefed.primitives._files import read_text, write_atomic
from securefed.primitives.identity import PublicIdentity, SiteIdentity
from securefed.primitives.roster import Roster

__all__ = ["add_keys_commands", "fingerprint", "PRIVATE_SUFFIX", "PUBLIC_SUFFIX"]

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".public.json"
# The "format" tags of the files securefed.primitives writes.
_PRIVATE_FORMAT = "securefed-site-identity"
_ROSTER_FORMAT = "securefed-roster"


def fingerprint(key: bytes) -> str:
    """A public key's fingerprint: the first 16 bytes of its SHA-256, in groups of 4 hex digits."""
    digest = hashlib.sha256(key).hexdigest()[:32]
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def _describe(identity: PublicIdentity) -> dict[str, str]:
    return {"name": identity.name,
            "verify_key_fingerprint": fingerprint(identity.verify_key),
            "encryption_key_fingerprint": fingerprint(identity.encryption_key)}


def _read_json(path: Path, what: str) -> object:
    # The error names the position only: the file may hold secrets.
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what} {path} is not JSON (line {error.lineno}, column {error.colno})") from None


def _format_of(document: object) -> object:
    return document.get("format") if isinstance(document, dict) else None


def _cmd_create(args: argparse.Namespace) -> int:
    problems = site_name_problems(args.name)
    if problems:
        raise ConfigError(problems)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give the folder to write the key files into")
    private, public = out / f"{args.name}{PRIVATE_SUFFIX}", out / f"{args.name}{PUBLIC_SUFFIX}"
    existing = [str(p) for p in (private, public) if p.exists() or p.is_symlink()]
    if existing and not args.force:
        raise ConfigError(f"{' and '.join(existing)} already exist(s); pass --force to replace them "
                          "(a replaced private key cannot be recovered, and the roster must be rebuilt)")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = SiteIdentity.generate(args.name)
    identity.save(private, overwrite=args.force)
    text = json.dumps(identity.public().to_dict(), indent=2) + "\n"
    write_atomic(public, text.encode("utf-8"), mode=0o644, overwrite=args.force)
    shown = _describe(identity.public())
    print(f"created the identity of site {args.name!r}")
    print(f"  private key     {private}  (mode 0600: keep it at the site, never send it)")
    print(f"  public identity {public}  (send this to the coordinator for the roster)")
    print(f"  signing key     {shown['verify_key_fingerprint']}")
    print(f"  encryption key  {shown['encryption_key_fingerprint']}")
    return 0


def _public_identity(path: Path, problems: list[str]) -> PublicIdentity | None:
    try:
        document = _read_json(path, "public identity file")
    except ConfigError as error:
        problems.extend(error.problems)
        return None
    kind = _format_of(document)
    if kind == _PRIVATE_FORMAT:
        problems.append(f"{path} is a PRIVATE identity file; pass the site's {PUBLIC_SUFFIX} file instead "
                        "(a private key must never leave its site)")
        return None
    if kind == _ROSTER_FORMAT:
        problems.append(f"{path} is already a roster; pass the sites' {PUBLIC_SUFFIX} files")
        return None
    try:
        identity = PublicIdentity.from_dict(document)
    except ConfigError as error:
        problems.extend(f"{path}: {p}" for p in error.problems)
        return None
    problems.extend(f"{path}: {p}" for p in site_name_problems(identity.name))
    return identity


def _cmd_roster(args: argparse.Namespace) -> int:
    out = Path(args.out)
    problems: list[str] = []
    if (out.exists() or out.is_symlink()) and not args.force:
        problems.append(f"{out} already exists; pass --force to overwrite it")
    identities = [_public_identity(Path(p), problems) for p in args.public_files]
    if problems:
        raise ConfigError(problems)
    roster = Roster(i for i in identities if i is not None)  # ConfigError for duplicate names or keys
    roster.save(out, overwrite=args.force)
    print(f"wrote {out}: {len(roster)} sites in this order: {', '.join(roster.names)}")
    print(f"  roster digest {roster.digest().hex()}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    path = Path(args.file)
    document = _read_json(path, "key file")
    kind = _format_of(document)
    if kind == _PRIVATE_FORMAT:
        # load() refuses a file others may read, and checks the secrets without showing them.
        summary = {"file": str(path), "kind": "private identity",
                   **_describe(SiteIdentity.load(path).public())}
        entries = [summary]
    elif kind == _ROSTER_FORMAT:
        roster = Roster.load(path)
        summary = {"file": str(path), "kind": "roster", "digest": roster.digest().hex(),
                   "sites": [_describe(i) for i in roster.identities]}
        entries = summary["sites"]
    else:
        try:
            identity = PublicIdentity.from_dict(document)
        except ConfigError as error:
            raise ConfigError([f"{path} is not a securefed key or roster file: {p}" for p in error.problems]) from None
        summary = {"file": str(path), "kind": "public identity", **_describe(identity)}
        entries = [summary]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{path}: {summary['kind']}" + (f", digest {summary['digest']}" if "digest" in summary else ""))
    for entry in entries:
        print(f"  site {entry['name']}")
        print(f"    signing key     {entry['verify_key_fingerprint']}")
        print(f"    encryption key  {entry['encryption_key_fingerprint']}")
    return 0


def add_keys_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``securefed keys create|roster|show``."""
    keys = sub.add_parser("keys", help="create site identities, build the roster, show key files")
    commands = keys.add_subparsers(dest="keys_command", required=True)

    create = commands.add_parser("create", help="create a site's private key file and public identity")
    create.add_argument("name", help="the site's name: letters, digits, '-', '_' and '.'")
    create.add_argument("--out", metavar="DIR", default=".", help="folder for the two files (default: here)")
    create.add_argument("--force", action="store_true", help="replace existing files")
    create.set_defaults(func=_cmd_create)

    roster = commands.add_parser("roster", help="build the federation roster from the sites' public identities")
    roster.add_argument("public_files", nargs="+", metavar="PUBLIC_FILE",
                        help=f"each site's {PUBLIC_SUFFIX} file, in the roster's order")
    roster.add_argument("--out", metavar="FILE", default="roster.json", help="the roster file (default roster.json)")
    roster.add_argument("--force", action="store_true", help="overwrite an existing roster file")
    roster.set_defaults(func=_cmd_roster)

    show = commands.add_parser("show", help="print the names and key fingerprints in a key or roster file")
    show.add_argument("file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_cmd_show)
