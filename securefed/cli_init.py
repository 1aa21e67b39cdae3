"""``securefed init``: write a commented example config that documents every option.

The example (``securefed/federation/example_config.toml``, shipped with the package) sets every
key to the default of ``securefed run``, so editing one line changes one thing.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from securefed.errors import ConfigError
from securefed.primitives._files import write_atomic

__all__ = ["add_init_command", "example_config_text", "DEFAULT_CONFIG_NAME"]

DEFAULT_CONFIG_NAME = "securefed.toml"


def example_config_text() -> str:
    """The commented example config, as shipped with the package."""
    return resources.files("securefed.federation").joinpath("example_config.toml").read_text(encoding="utf-8")


def _cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.path)
    if target.is_dir():
        raise ConfigError(f"{target} is a directory; give a file name, e.g. {target / DEFAULT_CONFIG_NAME}")
    if (target.exists() or target.is_symlink()) and not args.force:
        raise ConfigError(f"{target} already exists; pass --force to overwrite it")
    try:
        write_atomic(target, example_config_text().encode("utf-8"), mode=0o644, overwrite=args.force)
    except ConfigError as error:
        if target.exists() and not args.force:  # created by someone else since the check above
            raise ConfigError(f"{target} already exists; pass --force to overwrite it") from None
        raise ConfigError(error.problems) from None
    print(f"wrote {target}: every option with a comment, set to the defaults of `securefed run`")
    print(f"edit it, then run it with: securefed run {target}")
    return 0


def add_init_command(sub: argparse._SubParsersAction) -> None:
    """Register ``securefed init [PATH] [--force]``."""
    init = sub.add_parser("init", help="write a commented example config covering every option")
    init.add_argument("path", nargs="?", default=DEFAULT_CONFIG_NAME,
                      help=f"where to write it (default {DEFAULT_CONFIG_NAME})")
    init.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    init.set_defaults(func=_cmd_init)
