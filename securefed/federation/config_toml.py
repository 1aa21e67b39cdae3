"""A small TOML writer for the flat federation schema (the standard library only reads TOML).

It writes what :func:`securefed.federation.config.config_to_dict` produces: tables of scalars
(strings, integers, floats, booleans) and arrays of scalars, plus arrays of such tables
(``[[sites]]``). Anything deeper is refused rather than written wrongly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["dumps_toml"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"TOML keys must be strings, got {type(name).__name__}")
    return name if _BARE_KEY.fullmatch(name) else _string(name)  # fullmatch: "$" would allow a trailing newline


def _string(text: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX ...) are all valid in TOML basic strings; DEL is the one
    # control character JSON leaves alone and TOML forbids.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _scalar(value: object, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # always has a '.' or an exponent, so it reads back as a float
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"{where}: cannot write a {type(value).__name__} as a TOML scalar")


def _value(value: object, where: str) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v, where) for v in value) + "]"
    return _scalar(value, where)


def _table_body(table: Mapping[str, Any], where: str) -> list[str]:
    lines = []
    for name, value in table.items():
        if isinstance(value, Mapping):
            raise TypeError(f"{where}.{name}: nested tables are not part of the config schema")
        lines.append(f"{_key(name)} = {_value(value, f'{where}.{name}')}")
    return lines


def _is_table_array(value: object) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, Mapping) for v in value)


def dumps_toml(document: Mapping[str, Any]) -> str:
    """Write ``document`` as TOML: top-level scalars, then ``[tables]``, then ``[[arrays of tables]]``.

    Raises TypeError for values the flat schema does not have (nested tables, None, objects).
    """
    head: list[str] = []
    tables: list[str] = []
    arrays: list[str] = []
    for name, value in document.items():
        if isinstance(value, Mapping):
            tables += ["", f"[{_key(name)}]", *_table_body(value, name)]
        elif _is_table_array(value):
            for entry in value:
                arrays += ["", f"[[{_key(name)}]]", *_table_body(entry, name)]
        else:
            head.append(f"{_key(name)} = {_value(value, name)}")
    text = "\n".join(head + tables + arrays).lstrip("\n")
    return text + "\n" if text else ""
