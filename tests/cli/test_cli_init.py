"""``securefed init``: the example config documents every key and reads back as the default."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from securefed.federation.config import SiteSpec, default_config, load_config
from securefed.federation.config_schema import (
    SECTIONS,
    SITE_KEYS,
    SITE_PRIVACY_KEYS,
    SITE_TRAINING_KEYS,
    SITES_SECTION,
)


def securefed(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "securefed", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


_HEADER = re.compile(r"^(?:#\s*)?\[(\[?)([A-Za-z_]+)\]?\]\s*$")
_KEY = re.compile(r"^(?:#\s*)?([A-Za-z_][A-Za-z0-9_]*) = ")


def documented_keys(text: str) -> set[tuple[str, str]]:
    """(section, key) of every key line, commented out or not, whose previous line is a comment."""
    found, section, previous = set(), None, ""
    for line in text.splitlines():
        header, key = _HEADER.match(line), _KEY.match(line)
        if header:
            section = header.group(2)
        elif key and section is not None:
            explained = previous.startswith("#") and not _KEY.match(previous) and not _HEADER.match(previous)
            if explained and len(previous.lstrip("# ")) > 10:
                found.add((section, key.group(1)))
        previous = line
    return found


def test_init_writes_the_documented_default(tmp_path: Path) -> None:
    proc = securefed("init", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = tmp_path / "securefed.toml"
    assert "securefed.toml" in proc.stdout
    assert load_config(written) == default_config()
    documented = documented_keys(written.read_text(encoding="utf-8"))
    schema = {(s, k) for s, keys in SECTIONS.items() for k in keys} | {(SITES_SECTION, k) for k in SITE_KEYS}
    # A site's overrides of [training]/[privacy] keys are documented there; the [[sites]] example
    # must at least name each of them.
    sites_text = written.read_text(encoding="utf-8").split("# [[sites]]", 1)[1]
    overrides = {(SITES_SECTION, k) for k in SITE_TRAINING_KEYS + SITE_PRIVACY_KEYS}
    assert all(k in sites_text for _, k in overrides), "a per-site key the [[sites]] example does not name"
    assert schema - overrides - documented == set(), "keys without a commented line in the example file"
    assert documented - schema == set(), "the example file documents keys the schema does not have"


def test_the_commented_sites_example_is_a_valid_variant(tmp_path: Path) -> None:
    assert securefed("init", str(tmp_path / "c.toml")).returncode == 0
    lines = (tmp_path / "c.toml").read_text(encoding="utf-8").splitlines()
    start = lines.index("# [[sites]]")
    variant = [line for line in lines[:start] if line != "sites = 4"]
    variant += [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines[start:]]
    (tmp_path / "named.toml").write_text("\n".join(variant) + "\n", encoding="utf-8")
    config = load_config(tmp_path / "named.toml")
    assert config.sites == (SiteSpec(name="st-thomas", epsilon_budget=3.0, learning_rate=0.05, batch_size=8),
                            SiteSpec(name="addenbrookes"))
    assert config.training_for("st-thomas").batch_size == 8 and config.training_for("addenbrookes").batch_size == 16
    assert config.federation == default_config().federation


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "mine.toml"
    target.write_text("[federation]\nrounds = 7\n")
    proc = securefed("init", str(target))
    assert proc.returncode == 2
    assert f"{target} already exists; pass --force to overwrite it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert target.read_text() == "[federation]\nrounds = 7\n"
    proc = securefed("init", str(target), "--force")
    assert proc.returncode == 0, proc.stderr
    assert load_config(target) == default_config()


def test_init_reports_bad_targets(tmp_path: Path) -> None:
    proc = securefed("init", str(tmp_path))
    assert proc.returncode == 2 and "is a directory" in proc.stderr
    proc = securefed("init", str(tmp_path / "no" / "such" / "dir.toml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
