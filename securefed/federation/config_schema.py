"""The TOML schema of a federation config: every section, key and type.

These tables drive parsing (type checks, "did you mean" for unknown keys, the TOML value that
means "unset"), writing a config back (:func:`securefed.federation.config.config_to_dict`) and
the test that ``securefed init``'s example file (``example_config.toml``, where each key's
meaning is documented) covers every key.
"""

from __future__ import annotations

import datetime
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from securefed._values import is_int

__all__ = [
    "Key",
    "SECTIONS",
    "SITE_KEYS",
    "SITE_TRAINING_KEYS",
    "SITE_PRIVACY_KEYS",
    "SITES_SECTION",
    "INVALID",
    "convert",
    "describe_value",
    "unknown_key_problem",
    "unknown_section_problem",
]

# What each kind of key accepts, in the words of a type problem.
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "path": "a string (a file or folder path)",
    "ints": "an array of integers",
    "neighbors": "\"auto\", \"all\" or an even integer",
}


class _Invalid:
    def __repr__(self) -> str:
        return "INVALID"


INVALID: Any = _Invalid()  # returned by convert() after it recorded a problem
_NO_UNSET = object()


@dataclass(frozen=True)
class Key:
    """One key of a section: its kind (see ``_EXPECTED``) and its "unset" value.

    ``unset`` is the TOML value that stands for Python's None (TOML has no null), e.g. 0 for
    ``steps_per_round``; keys without one never hold None.
    """

    kind: str
    unset: Any = _NO_UNSET

    @property
    def has_unset(self) -> bool:
        return self.unset is not _NO_UNSET

    @property
    def expected(self) -> str:
        return _EXPECTED[self.kind]


SITES_SECTION = "sites"  # the [[sites]] array of tables

SECTIONS: dict[str, dict[str, Key]] = {
    "federation": {
        "rounds": Key("int"),
        "sites": Key("int"),  # a count; [[sites]] tables are the alternative
        "aggregation": Key("str"),
        "seed": Key("int"),
        "sites_per_round": Key("int"),
        "workers": Key("int"),
    },
    "secagg": {
        "neighbors": Key("neighbors"),
        "threshold": Key("int", unset=0),
        "bit_width": Key("int"),
        "clip": Key("float"),
    },
    "data": {
        "kind": Key("str"),
        "path": Key("path", unset=""),
        "split": Key("str"),
        "alpha": Key("float"),
        "val_fraction": Key("float"),
        "test_fraction": Key("float"),
        "samples": Key("int", unset=0),
        "image_size": Key("int", unset=0),
        "labels_csv": Key("path", unset=""),
    },
    "model": {
        "name": Key("str"),
        "factory": Key("str", unset=""),
        "hidden": Key("ints"),
        "features": Key("ints", unset=[]),
    },
    "training": {
        "learning_rate": Key("float"),
        "optimizer": Key("str"),
        "momentum": Key("float"),
        "batch_size": Key("int"),
        "epochs_per_round": Key("float", unset=0),
        "steps_per_round": Key("int", unset=0),
        "max_physical_batch_size": Key("int", unset=0),
        "device": Key("str"),
    },
    "privacy": {
        "enabled": Key("bool"),
        "target_epsilon": Key("float"),
        "delta": Key("float"),
        "max_grad_norm": Key("float"),
        "noise_multiplier": Key("float", unset=0),
        "accountant": Key("str"),
        "clipping": Key("str"),
        "budget_epsilon": Key("float", unset=0),
    },
    "site_dp": {
        "mode": Key("str"),
        "l2_clip": Key("float"),
        "noise_multiplier": Key("float"),
    },
    "evaluation": {
        "every": Key("int"),
    },
    "he": {
        "poly_modulus_degree": Key("int"),
        "coeff_mod_bit_sizes": Key("ints"),
        "scale_bits": Key("int"),
        "clip": Key("float"),
        "min_sites": Key("int"),
        "dealer": Key("str"),
    },
}

# A site's own settings: its name, budget, and overrides of the [training] and [privacy] keys.
SITE_TRAINING_KEYS = ("learning_rate", "optimizer", "momentum", "batch_size", "epochs_per_round",
                      "steps_per_round", "max_physical_batch_size", "device")
SITE_PRIVACY_KEYS = ("target_epsilon", "max_grad_norm", "noise_multiplier")
SITE_KEYS: dict[str, Key] = {
    "name": Key("str"),
    "epsilon_budget": Key("float", unset=0),
    **{k: SECTIONS["training"][k] for k in SITE_TRAINING_KEYS},
    **{k: SECTIONS["privacy"][k] for k in SITE_PRIVACY_KEYS},
}


def describe_value(value: object) -> str:
    """Name a TOML value the way a user wrote it: its TOML type and, if short, the value."""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string \"{shown}\""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    return f"a {type(value).__name__}"



def _is_unset(key: Key, value: object) -> bool:
    if not key.has_unset or isinstance(value, bool):
        return False
    numeric = (int, float) if key.kind == "float" else (type(key.unset),)
    return isinstance(value, numeric) and value == key.unset


def convert(label: str, name: str, key: Key, value: object, *, base_dir: Path,
            problems: list[str]) -> Any:
    """The Python value of a TOML ``value`` for ``key``, or INVALID after recording a problem.

    Only the type is checked here (ranges and allowed values are checked by the section's
    dataclass); the key's "unset" value becomes None; relative paths join ``base_dir``.
    ``label`` says where the key is in problems: ``"[data]"`` or ``"[[sites]] entry 2"``.
    """
    if _is_unset(key, value):
        return None
    kind = key.kind
    ok = (
        (kind == "int" and is_int(value))
        or (kind == "float" and (is_int(value) or isinstance(value, float)))
        or (kind == "bool" and isinstance(value, bool))
        or (kind in ("str", "path") and isinstance(value, str))
        or (kind == "ints" and isinstance(value, list) and all(is_int(v) for v in value))
        or (kind == "neighbors" and (is_int(value) or isinstance(value, str)))
    )
    if not ok:
        given = describe_value(value)
        if kind == "ints" and isinstance(value, list):
            given = "an array holding " + ", ".join(sorted({describe_value(v).split(" ")[1] for v in value
                                                            if not is_int(v)}))
        problems.append(f"{label} {name} must be {key.expected}, got {given}")
        return INVALID
    if kind == "float":
        return float(value)  # type: ignore[arg-type]
    if kind == "ints":
        return tuple(value)  # type: ignore[arg-type]
    if kind == "path":
        path = Path(value).expanduser()  # type: ignore[arg-type]
        return path if path.is_absolute() else base_dir / path
    return value


def _close(word: str, choices: list[str]) -> str | None:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_problem(section: str, name: str, known: list[str]) -> str:
    """Problem for ``name`` in ``[section]``: a near miss, a key of another section, or the list."""
    shown = f"[[{section}]]" if section == SITES_SECTION else f"[{section}]"
    guess = _close(name, known)
    if guess:
        return f"unknown key '{name}' in {shown}; did you mean '{guess}'?"
    homes = [s for s, keys in SECTIONS.items() if name in keys and s != section]
    if homes:
        return f"unknown key '{name}' in {shown}; it belongs in [{homes[0]}]"
    return f"unknown key '{name}' in {shown}; known keys: {', '.join(known)}"


def unknown_section_problem(name: str) -> str:
    """Problem for a top-level ``name`` that is no section (perhaps a key put outside one)."""
    sections = [*SECTIONS, SITES_SECTION]
    guess = _close(name, sections)
    if guess:
        shown = f"[[{guess}]]" if guess == SITES_SECTION else f"[{guess}]"
        return f"unknown section [{name}]; did you mean {shown}?"
    homes = [s for s, keys in SECTIONS.items() if name in keys]
    if homes:
        return f"'{name}' is outside any section; put it under [{homes[0]}]"
    return f"unknown section [{name}]; the sections are {', '.join(f'[{s}]' for s in SECTIONS)} and [[sites]]"
