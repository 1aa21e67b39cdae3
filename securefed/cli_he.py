"""``securefed he``: deal the CKKS key of encrypted aggregation to the sites of a deployment.

The administrator (the key dealer, a member of the roster) runs ``he keygen``: it makes a fresh
CKKS key and writes a keyset folder holding ``public-context.bin`` (for the coordinator: it adds
ciphertexts but cannot decrypt), ``sealed/<site>.bin`` (the secret context sealed to each site's
roster key and signed by the dealer) and ``keyset.json`` (the public facts: run id, dealer,
parameters, digests). The secret context is never written in the clear. Each site runs
``he open`` to check its delivery and write its secret context (mode 0600). One key serves one
run: ``he rotate`` deals a new key and run id with the same parameters for the next run.

The public context holds the parameters only (symmetric CKKS: no public key), so its digest is
the same for every key with those parameters; the run id and the secret context's digest name a
key. keyset.json is not signed (each delivery is), so a site pins what the dealer announced over
another channel with ``--run-id`` and ``--dealer``.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from securefed.errors import (ConfigError, DecryptionError, InvalidSignatureError, MalformedMessageError,
                              ProtocolAbort)
from securefed.federation.config_sections import site_name_problems
from securefed.he.config import HEConfig
from securefed.he.keys import RUN_ID_SIZE, SealedContext, context_digest, open_context, seal_context
from securefed.primitives._files import read_text, write_atomic
from securefed.primitives.identity import SiteIdentity
from securefed.primitives.roster import Roster

__all__ = ["add_he_commands", "KEYSET_FILE", "PUBLIC_CONTEXT_FILE", "SEALED_DIR", "SECURITY_LEVEL"]

KEYSET_FILE = "keyset.json"
PUBLIC_CONTEXT_FILE = "public-context.bin"
SEALED_DIR = "sealed"
SECURITY_LEVEL = "128-bit (HE standard)"
_KEYSET_FORMAT = "securefed-he-keyset"
_KEYSET_VERSION = 1
# HEConfig field -> the keygen flag that sets it, so a problem names what to change.
_FLAGS = {"poly_modulus_degree": "--poly-modulus-degree", "coeff_mod_bit_sizes": "--coeff-mod-bit-sizes",
          "scale_bits": "--scale-bits", "max_weight": "--max-weight", "max_sites": "--max-sites", "clip": "--clip"}
_ROTATION = ("one key serves one run: deal a new one for every run with `securefed he rotate`, "
             "which keeps the parameters and draws a new key and run id")


# ---- parameters ---------------------------------------------------------------------------------

def _parameters(config: HEConfig) -> dict[str, object]:
    return {"poly_modulus_degree": config.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(config.coeff_mod_bit_sizes), "scale_bits": config.scale_bits,
            "clip": config.clip, "max_weight": config.max_weight, "max_sites": config.max_sites}


def _config_from_flags(args: argparse.Namespace) -> HEConfig:
    problems: list[str] = []
    given: dict[str, object] = {}
    if args.coeff_mod_bit_sizes is not None:
        try:
            given["coeff_mod_bit_sizes"] = tuple(int(b) for b in args.coeff_mod_bit_sizes.split(","))
        except ValueError:
            problems.append(f"--coeff-mod-bit-sizes {args.coeff_mod_bit_sizes!r}: expected prime sizes in bits "
                            "separated by commas, e.g. 60,49")
    for field in ("poly_modulus_degree", "scale_bits", "clip", "max_weight", "max_sites"):
        if getattr(args, field) is not None:
            given[field] = getattr(args, field)
    try:
        config = HEConfig(**given)
    except ConfigError as error:
        problems.extend(_name_flags(p) for p in error.problems)
    if problems:
        raise ConfigError(problems)
    return config


def _name_flags(problem: str) -> str:
    for field, flag in _FLAGS.items():
        problem = problem.replace(field, flag)
    return problem


def _describe_parameters(config: HEConfig) -> str:
    primes = "+".join(str(b) for b in config.coeff_mod_bit_sizes)
    return (f"ring {config.poly_modulus_degree} ({config.slots} values per ciphertext), primes {primes} bits, "
            f"scale 2^{config.scale_bits}, clip {config.clip:g}, max weight {config.max_weight:g}, "
            f"up to {config.max_sites} sites; {SECURITY_LEVEL}")


# ---- keyset folder ------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what} {path} is not JSON (line {error.lineno}, column {error.colno})") from None


def _load_keyset(folder: Path) -> tuple[dict, HEConfig]:
    """keyset.json of ``folder``, checked field by field (every problem at once), and its HEConfig."""
    if not folder.is_dir():
        raise ConfigError(f"--keyset {folder} is not a folder; give the folder `securefed he keygen` wrote")
    path = folder / KEYSET_FILE
    document = _read_json(path, "keyset file")
    if not isinstance(document, dict) or document.get("format") != _KEYSET_FORMAT:
        raise ConfigError(f"{path} is not a securefed HE keyset (missing or wrong 'format' tag)")
    if document.get("version") != _KEYSET_VERSION:
        raise ConfigError(f"{path} has version {document.get('version')!r}; this securefed reads "
                          f"version {_KEYSET_VERSION}")
    problems: list[str] = []
    run_id = document.get("run_id")
    if not isinstance(run_id, str) or len(run_id) != 2 * RUN_ID_SIZE or not _is_hex(run_id):
        problems.append(f"run_id must be {RUN_ID_SIZE} bytes of hex")
    for key in ("public_context_sha256", "secret_context_sha256"):
        value = document.get(key)
        if not isinstance(value, str) or len(value) != 64 or not _is_hex(value):
            problems.append(f"{key} must be 32 bytes of hex")
    if not isinstance(document.get("dealer"), str):
        problems.append("dealer must be a site name")
    sites = document.get("sites")
    if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and not site_name_problems(s)
                                                            for s in sites):
        problems.append("sites must be a non-empty list of site names")
    parameters = document.get("parameters")
    config = None
    if not isinstance(parameters, dict) or set(parameters) != set(_FLAGS):
        problems.append(f"parameters must hold exactly {sorted(_FLAGS)}")
    else:
        try:
            config = HEConfig(**parameters)
        except ConfigError as error:
            problems.extend(f"parameters: {p}" for p in error.problems)
    if problems or config is None:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return document, config


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _public_digest(folder: Path, document: dict) -> bytes:
    """The digest of the folder's public context, recomputed, and checked against keyset.json."""
    path = folder / PUBLIC_CONTEXT_FILE
    try:
        digest = context_digest(path.read_bytes())
    except OSError as error:
        raise ConfigError(f"cannot read the public context {path}: {type(error).__name__}") from None
    if digest.hex() != document["public_context_sha256"]:
        raise ConfigError(f"{path} does not match the public context digest in {folder / KEYSET_FILE}: the keyset "
                          "was altered or mixed with another run's files; ask the dealer for it again")
    return digest


def _fresh_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a new folder for the keyset")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; give a new folder (a keyset is never written over "
                          "another run's files)")


def _load_dealer(path: str, roster: Roster) -> SiteIdentity:
    dealer = SiteIdentity.load(path)
    if dealer.name not in roster:
        raise ConfigError(f"the dealer {dealer.name!r} is not in the roster ({', '.join(roster.names)}); the sites "
                          "accept a key only from a roster member: add the dealer's public identity to the roster")
    if roster[dealer.name] != dealer.public():
        raise ConfigError(f"the roster's keys for {dealer.name!r} are not those of {path}; the sites would refuse "
                          "its signature: rebuild the roster with this identity's public file")
    return dealer


def _deal(config: HEConfig, dealer: SiteIdentity, roster: Roster, out: Path) -> dict[str, object]:
    """Make a new key and run id and write the keyset into ``out`` (created, mode 0700)."""
    problems = [f"roster: {p}" for name in roster.names for p in site_name_problems(name)]
    if len(roster) > config.max_sites:
        problems.append(f"the roster has {len(roster)} sites but the HE parameters sum at most max_sites = "
                        f"{config.max_sites}; make a keyset with --max-sites {len(roster)} or more")
    if problems:
        raise ConfigError(problems)
    run_id = os.urandom(RUN_ID_SIZE)
    public, deliveries = _sealed_key(config, dealer, roster, run_id)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    (out / SEALED_DIR).mkdir(mode=0o755)
    write_atomic(out / PUBLIC_CONTEXT_FILE, public, mode=0o644, overwrite=False)
    for name, delivery in deliveries.items():
        write_atomic(out / SEALED_DIR / f"{name}.bin", delivery.encode(), mode=0o644, overwrite=False)
    first = next(iter(deliveries.values()))
    document = {"format": _KEYSET_FORMAT, "version": _KEYSET_VERSION, "run_id": run_id.hex(),
                "dealer": dealer.name, "parameters": _parameters(config), "security_level": SECURITY_LEVEL,
                "public_context_sha256": first.public_digest.hex(),
                "secret_context_sha256": first.secret_digest.hex(),
                "roster_sha256": roster.digest().hex(), "sites": list(roster.names),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # Written last: a folder without keyset.json is an interrupted keygen, which open and show refuse.
    write_atomic(out / KEYSET_FILE, (json.dumps(document, indent=2) + "\n").encode(), mode=0o644, overwrite=False)
    return document


def _sealed_key(config: HEConfig, dealer: SiteIdentity, roster: Roster,
                run_id: bytes) -> tuple[bytes, dict[str, SealedContext]]:
    from securefed.he.tenseal_ckks import new_context  # TenSEAL loads only when a key is made

    # The secret context lives only in this frame: it is sealed to every site and then dropped.
    secret, public = new_context(config)
    deliveries = seal_context(dealer=dealer, roster=roster, secret_context=secret, public_context=public,
                              run_id=run_id)
    del secret
    return public, deliveries


def _print_keyset(out: Path, document: dict, config: HEConfig) -> None:
    print(f"  run id          {document['run_id']}")
    print(f"  dealer          {document['dealer']}")
    print(f"  parameters      {_describe_parameters(config)}")
    print(f"  public context  {out / PUBLIC_CONTEXT_FILE}  sha256 {document['public_context_sha256']}  "
          "(parameters only: no key)")
    print(f"  secret context  sha256 {document['secret_context_sha256']}  (never written in the clear)")
    print(f"  sites           {', '.join(document['sites'])}")


def _print_handout(out: Path) -> None:
    print("next:")
    print(f"  coordinator  gets {out / PUBLIC_CONTEXT_FILE} and {out / KEYSET_FILE} (it cannot decrypt)")
    print(f"  each site    gets {out / KEYSET_FILE}, {out / PUBLIC_CONTEXT_FILE} and {out / SEALED_DIR}/<site>.bin, "
          "then runs `securefed he open`")
    print("  everyone     compares the run id and the secret context's digest with the dealer's, over "
          "another channel")


# ---- commands -----------------------------------------------------------------------------------

def _cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    problems: list[str] = []
    config = None
    try:
        config = _config_from_flags(args)
    except ConfigError as error:
        problems.extend(error.problems)
    try:
        _fresh_folder(out)
    except ConfigError as error:
        problems.extend(error.problems)
    if problems or config is None:
        raise ConfigError(problems)
    roster = Roster.load(args.roster)
    dealer = _load_dealer(args.dealer, roster)
    document = _deal(config, dealer, roster, out)
    if args.json:
        print(json.dumps({"keyset": str(out), **document}, indent=2))
        return 0
    print(f"dealt a new CKKS key to {len(roster)} sites into {out}")
    _print_keyset(out, document, config)
    _print_handout(out)
    print(f"  {_ROTATION}")
    return 0


def _cmd_open(args: argparse.Namespace) -> int:
    folder, out = Path(args.keyset), Path(args.out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out} already exists and is never overwritten; it may hold an earlier run's "
                          "secret context: delete it once that run is over, or give another file")
    document, config = _load_keyset(folder)
    identity = SiteIdentity.load(args.site_identity)
    roster = Roster.load(args.roster)
    problems = site_name_problems(identity.name)
    if args.run_id is not None and args.run_id.lower() != document["run_id"]:
        problems.append(f"{folder / KEYSET_FILE} is for run {document['run_id']}, not the announced run "
                        f"{args.run_id}: refuse it and ask the dealer")
    if args.dealer is not None and args.dealer != document["dealer"]:
        problems.append(f"{folder / KEYSET_FILE} names dealer {document['dealer']!r}, not the announced dealer "
                        f"{args.dealer!r}: refuse it and ask the administrator")
    if identity.name not in roster:
        problems.append(f"site {identity.name!r} is not in the roster {args.roster}")
    if problems:
        raise ConfigError(problems)
    public_digest = _public_digest(folder, document)
    path = folder / SEALED_DIR / f"{identity.name}.bin"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"there is no delivery for site {identity.name!r} in {folder} ({path}: "
                          f"{type(error).__name__}); the keyset is for {', '.join(document['sites'])}") from None
    try:
        secret = open_context(SealedContext.decode(data), identity=identity, roster=roster,
                              dealer=document["dealer"], run_id=bytes.fromhex(document["run_id"]),
                              public_digest=public_digest)
    except (MalformedMessageError, InvalidSignatureError, DecryptionError, ProtocolAbort) as error:
        raise ConfigError(f"the delivery {path} is refused ({type(error).__name__}): {error}") from None
    if context_digest(secret).hex() != document["secret_context_sha256"]:
        raise ConfigError(f"the delivery {path} holds another key than {folder / KEYSET_FILE} names: "
                          "the keyset was mixed with another run's files")
    _check_is_secret_context(config, secret, path)
    write_atomic(out, secret, mode=0o600, overwrite=False)
    del secret
    print(f"site {identity.name!r} opened its CKKS key: dealer {document['dealer']!r} signed it for this site")
    print(f"  run id          {document['run_id']}")
    print(f"  secret context  {out}  sha256 {document['secret_context_sha256']}  (mode 0600: keep it at the "
          "site, never send it)")
    print("  compare the run id and the digest with the dealer's over another channel; delete the file "
          "when the run is over")
    return 0


def _check_is_secret_context(config: HEConfig, secret: bytes, path: Path) -> None:
    from securefed.he.tenseal_ckks import CKKSCodec

    try:
        holds_secret = CKKSCodec(config, secret).holds_secret_key
    except MalformedMessageError as error:
        raise ConfigError(f"the delivery {path} verified but is not a CKKS context for the keyset's parameters "
                          f"({error}); ask the dealer for a new keyset") from None
    if not holds_secret:
        raise ConfigError(f"the delivery {path} verified but holds no CKKS secret key; ask the dealer for a new one")


def _cmd_rotate(args: argparse.Namespace) -> int:
    old, out = Path(args.keyset), Path(args.out)
    if old.exists() and out.exists() and old.resolve() == out.resolve():
        raise ConfigError(f"--out {out} is the old keyset's folder; rotation writes the new key to a new folder "
                          "(the old one stays until every site has deleted its old secret context)")
    if old.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} is inside the old keyset {old}; give a folder outside it")
    previous, config = _load_keyset(old)
    _fresh_folder(out)
    roster = Roster.load(args.roster)
    dealer = _load_dealer(args.dealer, roster)
    document = _deal(config, dealer, roster, out)
    print(f"rotated the CKKS key: {out} replaces {old} (same parameters, new key, new run id)")
    print(f"  old run id      {previous['run_id']}")
    _print_keyset(out, document, config)
    added = sorted(set(roster.names) - set(previous["sites"]))
    dropped = sorted(set(previous["sites"]) - set(roster.names))
    if added or dropped:
        print(f"  sites added     {', '.join(added) or '-'}; removed {', '.join(dropped) or '-'}")
    _print_handout(out)
    print(f"the old key (run {previous['run_id']}):")
    print("  each site     deletes its old secret context file once the old run is over")
    print(f"  coordinator   replaces its public context with {out / PUBLIC_CONTEXT_FILE}")
    print(f"  dealer        deletes {old} after that; uploads under the old key are refused by the new run")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    folder = Path(args.keyset)
    document, config = _load_keyset(folder)
    _public_digest(folder, document)
    missing = [s for s in document["sites"] if not (folder / SEALED_DIR / f"{s}.bin").is_file()]
    summary = {"keyset": str(folder), "run_id": document["run_id"], "dealer": document["dealer"],
               "parameters": _parameters(config), "security_level": SECURITY_LEVEL,
               "public_context_sha256": document["public_context_sha256"],
               "secret_context_sha256": document["secret_context_sha256"],
               "roster_sha256": document.get("roster_sha256"), "sites": document["sites"],
               "missing_deliveries": missing, "created": document.get("created")}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{folder}: CKKS keyset created {summary['created']}")
    _print_keyset(folder, document, config)
    if missing:
        print(f"  MISSING         no sealed delivery for {', '.join(missing)}")
    print(f"  {_ROTATION}")
    return 0


def add_he_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``securefed he keygen|open|rotate|show``."""
    he = sub.add_parser("he", help="deal, open, rotate and show the CKKS key of encrypted aggregation",
                        description="The dealer makes a CKKS key with `keygen` (a new key per run: `rotate`); "
                        "each site checks and opens its sealed copy with `open`; `show` prints a keyset's "
                        "public facts.")
    commands = he.add_subparsers(dest="he_command", required=True)

    keygen = commands.add_parser("keygen", help="make a new CKKS key and seal it to every site",
                                 description="Make a fresh CKKS key with a new random run id and write a keyset "
                                 "folder: public-context.bin for the coordinator, sealed/<site>.bin for each site "
                                 "(sealed to its roster key, signed by the dealer) and keyset.json. The secret "
                                 f"context is never written in the clear; {_ROTATION}.")
    keygen.add_argument("--roster", required=True, metavar="ROSTER.json", help="the federation roster")
    keygen.add_argument("--dealer", required=True, metavar="IDENTITY_FILE",
                        help="the dealer's private identity file (the dealer must be in the roster)")
    keygen.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the keyset")
    keygen.add_argument("--poly-modulus-degree", type=int, metavar="N", help="ring degree (default 4096)")
    keygen.add_argument("--coeff-mod-bit-sizes", metavar="B,B,...", help="prime sizes in bits (default 60,49)")
    keygen.add_argument("--scale-bits", type=int, metavar="S", help="fixed-point scale 2^S (default 50)")
    keygen.add_argument("--clip", type=float, metavar="C", help="values are clipped to [-C, C] (default 1)")
    keygen.add_argument("--max-weight", type=float, metavar="W", help="largest weight of a site (default 1)")
    keygen.add_argument("--max-sites", type=int, metavar="M", help="most sites in one sum (default 100)")
    keygen.add_argument("--json", action="store_true", help="print keyset.json's facts as JSON")
    keygen.set_defaults(func=_cmd_keygen)

    opener = commands.add_parser("open", help="a site checks its delivery and writes its secret context (0600)",
                                 description="Check this site's sealed delivery (the dealer's signature, this site, "
                                 "the run id, the public context's digest) and write the secret context to a new "
                                 "file with mode 0600.")
    opener.add_argument("--keyset", required=True, metavar="DIR", help="the keyset folder from the dealer")
    opener.add_argument("--site-identity", required=True, metavar="IDENTITY_FILE", help="this site's private identity")
    opener.add_argument("--roster", required=True, metavar="ROSTER.json", help="the federation roster")
    opener.add_argument("--out", required=True, metavar="SECRET_FILE", help="new file for the secret context")
    opener.add_argument("--run-id", metavar="HEX", help="the run id the dealer announced; refuse any other")
    opener.add_argument("--dealer", metavar="NAME", help="the dealer the federation agreed on; refuse any other")
    opener.set_defaults(func=_cmd_open)

    rotate = commands.add_parser("rotate", help="deal a new key and run id, same parameters",
                                 description="Make a completely new CKKS key and run id with the old keyset's "
                                 "parameters, into a new folder. Every run needs its own key: after rotating, "
                                 "each site deletes its old secret context and opens the new one, and the "
                                 "coordinator replaces its public context.")
    rotate.add_argument("--keyset", required=True, metavar="DIR", help="the old keyset folder")
    rotate.add_argument("--dealer", required=True, metavar="IDENTITY_FILE", help="the dealer's private identity file")
    rotate.add_argument("--roster", required=True, metavar="ROSTER.json", help="the federation roster (may have changed)")
    rotate.add_argument("--out", required=True, metavar="NEWDIR", help="a new or empty folder, not the old one")
    rotate.set_defaults(func=_cmd_rotate)

    show = commands.add_parser("show", help="print a keyset's public facts (never anything secret)")
    show.add_argument("--keyset", required=True, metavar="DIR")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_cmd_show)
