"""A federated run's configuration: the TOML file's sections in one frozen dataclass.

``load_config`` reads a TOML file, ``parse_config`` a mapping already read; both check types
and unknown keys (with "did you mean") and collect every problem of every section into one
:class:`~securefed.errors.ConfigError`. ``validate`` adds the checks that look across modules
(data, model, secure aggregation, privacy) without loading any data (see
:mod:`securefed.federation.config_checks`). ``config_to_dict`` and
:func:`dumps_toml` write a config back out. The sections are in
:mod:`securefed.federation.config_sections`, the key tables in
:mod:`securefed.federation.config_schema`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securefed.data import DataConfig, SplitKind, folder_site_names
from securefed.errors import ConfigError
from securefed.federation.config_checks import prefixed, validate
from securefed.federation.config_schema import (
    INVALID,
    SECTIONS,
    SITE_KEYS,
    SITE_PRIVACY_KEYS,
    SITE_TRAINING_KEYS,
    SITES_SECTION,
    Key,
    convert,
    unknown_key_problem,
    unknown_section_problem,
)
from securefed.federation.config_sections import (
    DEFAULT_SITES,
    MAX_SITES,
    Aggregation,
    EvaluationSettings,
    HESettings,
    PrivacySettings,
    RunSettings,
    SecAggSettings,
    SiteDPSettings,
    SiteSpec,
    numbered_sites,
    site_name_problems,
)
from securefed.federation.config_toml import dumps_toml
from securefed.federation.training_settings import Optimizer, TrainingSettings
from securefed.models import ModelConfig

if TYPE_CHECKING:
    from securefed.he import HEConfig
    from securefed.secagg import SecAggConfig

__all__ = [
    "Aggregation",
    "Optimizer",
    "RunSettings",
    "SiteSpec",
    "SecAggSettings",
    "TrainingSettings",
    "PrivacySettings",
    "SiteDPSettings",
    "EvaluationSettings",
    "HESettings",
    "FederationConfig",
    "DEFAULT_SITES",
    "numbered_sites",
    "site_name_problems",
    "load_config",
    "parse_config",
    "default_config",
    "validate",
    "config_to_dict",
    "dumps_toml",
]


def _site_list_problems(sites: tuple[SiteSpec, ...]) -> list[str]:
    problems = []
    if len(sites) < 2:
        problems.append(f"a federation needs at least 2 sites, got {len(sites)}; "
                        "set sites = N (N >= 2) in [federation] or list more [[sites]]")
    seen: dict[str, str] = {}
    reported = set()
    for site in sites:
        folded = site.name.casefold()
        if folded in seen and folded not in reported:
            reported.add(folded)
            if seen[folded] == site.name:
                count = sum(s.name == site.name for s in sites)
                problems.append(f"site name {site.name!r} appears {count} times; every site needs its own name")
            else:
                problems.append(f"site names {seen[folded]!r} and {site.name!r} differ only in case; "
                                "they would share a folder on some file systems, rename one")
        seen.setdefault(folded, site.name)
    return problems


# Each TOML section and the dataclass it becomes ([[sites]] and the site count aside).
_SECTION_CLASSES: dict[str, type] = {
    "federation": RunSettings, "secagg": SecAggSettings, "data": DataConfig, "model": ModelConfig,
    "training": TrainingSettings, "privacy": PrivacySettings, "site_dp": SiteDPSettings,
    "evaluation": EvaluationSettings, "he": HESettings,
}


def _federation_problems(run: RunSettings, sites: tuple[SiteSpec, ...]) -> list[str]:
    problems = _site_list_problems(sites)
    n = len(sites)
    if run.sites_per_round > n:
        problems.append(f"[federation] sites_per_round = {run.sites_per_round} is more than the {n} sites; "
                        f"use at most {n} (or 0 for every site)")
    if run.workers > n:
        problems.append(f"[federation] workers = {run.workers} is more than the {n} sites (each worker "
                        f"runs at least one site); use at most {n}, or 0 to run them in this process")
    return problems


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """Everything a federated run needs; see ``securefed init`` for a commented example."""

    federation: RunSettings = field(default_factory=RunSettings)
    sites: tuple[SiteSpec, ...] = field(default_factory=lambda: numbered_sites(DEFAULT_SITES))
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    site_dp: SiteDPSettings = field(default_factory=SiteDPSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    he: HESettings = field(default_factory=HESettings)

    def __post_init__(self) -> None:
        sites = tuple(SiteSpec(name=s) if isinstance(s, str) else s for s in self.sites)
        object.__setattr__(self, "sites", sites)
        problems = []
        for name, cls in _SECTION_CLASSES.items():
            if not isinstance(getattr(self, name), cls):
                problems.append(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        bad = [type(s).__name__ for s in sites if not isinstance(s, SiteSpec)]
        if bad:
            problems.append(f"sites must be SiteSpec objects (or names), got {', '.join(bad)}")
        if problems:
            raise ConfigError(problems)
        problems = _federation_problems(self.federation, sites)
        for site in sites:  # each site's own settings must make valid sections too
            for build in (self.training_for, self.privacy_for):
                try:
                    build(site.name)
                except ConfigError as error:
                    problems.extend(f"[[sites]] {site.name}: {p}" for p in error.problems)
        if problems:
            raise ConfigError(problems)

    def site(self, name: str) -> SiteSpec:
        """The SiteSpec named ``name`` (KeyError if there is none)."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    def training_for(self, name: str) -> TrainingSettings:
        """Site ``name``'s local training: ``[training]`` with the site's own values over it."""
        own = self.site(name).overrides(SITE_TRAINING_KEYS)
        if not own:
            return self.training
        if "steps_per_round" in own:  # a site's round length replaces the federation's, whichever form
            own.setdefault("epochs_per_round", None)
        elif "epochs_per_round" in own:
            own.setdefault("steps_per_round", None)
        return replace(self.training, **own)

    def privacy_for(self, name: str) -> PrivacySettings:
        """Site ``name``'s DP-SGD: ``[privacy]`` with the site's own values over it."""
        own = self.site(name).overrides(SITE_PRIVACY_KEYS)
        if not own:
            return self.privacy
        if "target_epsilon" in own:  # a site's own target means: calibrate to it
            own.setdefault("noise_multiplier", None)
        return replace(self.privacy, **own)

    def site_names(self) -> list[str]:
        """The sites' names in configuration order."""
        return [site.name for site in self.sites]

    def cohort_size(self) -> int:
        """Sites taking part in each round: ``sites_per_round``, or every site when it is 0."""
        return self.federation.sites_per_round or len(self.sites)

    def secagg_config(self) -> SecAggConfig:
        """The secure-aggregation settings (each site's update weighs 1.0)."""
        return self.secagg.to_secagg_config()

    def he_config(self) -> HEConfig:
        """The CKKS settings of ``aggregation = "he"``, for sums of up to a whole round's sites
        (with site-level DP: for exact sums of its noised ring elements)."""
        return self.he.he_config(max_sites=self.cohort_size(),
                                 integer_bits=self.secagg.bit_width if self.site_dp.enabled else None)

    def site_dp_threshold(self) -> int:
        """The fewest sites whose noise a released sum carries: site-level DP's worst case."""
        if self.federation.aggregation is Aggregation.HE:
            return self.he.min_sites
        return self.secagg_config().resolve(self.cohort_size())[1]


def default_config() -> FederationConfig:
    """The built-in run of ``securefed run``: 4 simulated hospitals, DP-SGD at each site, secure
    aggregation, the embedded breast-cancer data and a small MLP, 5 rounds, epsilon 3 per site."""
    return FederationConfig()


# -- reading -------------------------------------------------------------------------------------

def _section_values(section: str, table: object, keys: dict[str, Key], *, base_dir: Path,
                    problems: list[str], where: str | None = None) -> dict[str, Any]:
    where = where or f"[{section}]"
    if not isinstance(table, Mapping):
        problems.append(f"{where} must be a table of keys, got {type(table).__name__}")
        return {}
    values = {}
    for name, value in table.items():
        key = keys.get(name)
        if key is None:
            problems.append(unknown_key_problem(section, name, list(keys)))
            continue
        converted = convert(where, name, key, value, base_dir=base_dir, problems=problems)
        if converted is not INVALID:
            values[name] = converted
    return values


def _build(label: str, cls: type, values: dict[str, Any], problems: list[str]) -> Any:
    try:
        return cls(**values)
    except ConfigError as error:
        problems.extend(prefixed(label, error.problems))
        return None


def _sites_from_tables(entries: object, *, base_dir: Path, problems: list[str]) -> tuple[SiteSpec, ...] | None:
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        problems.append("top-level 'sites' must be [[sites]] tables (name = ...); to give a count write "
                        "sites = N under [federation]")
        return None
    sites, ok = [], True
    for position, entry in enumerate(entries, start=1):
        where = f"[[sites]] entry {position}"
        values = _section_values(SITES_SECTION, entry, SITE_KEYS, base_dir=base_dir, problems=problems,
                                 where=where)
        if "name" not in values:
            if "name" not in entry:
                problems.append(f"{where} has no name; add name = \"...\" (letters, digits, - _ .)")
            ok = False
            continue
        site = _build(where, SiteSpec, values, problems)
        ok = ok and site is not None
        sites.append(site)
    return tuple(sites) if ok else None


def parse_config(mapping: Mapping[str, Any], *, base_dir: str | Path | None = None) -> FederationConfig:
    """Build a :class:`FederationConfig` from a TOML-shaped mapping; missing sections take defaults.

    Relative paths in ``[data]`` are joined to ``base_dir`` (default: the current directory).
    Raises :class:`ConfigError` listing every problem found in every section.
    """
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"a config must be a table of sections, got {type(mapping).__name__}")
    base = Path(base_dir if base_dir is not None else ".").absolute()
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    site_tables: tuple[SiteSpec, ...] | None = None
    for name, table in mapping.items():
        if name in SECTIONS:
            values[name] = _section_values(name, table, SECTIONS[name], base_dir=base, problems=problems)
        elif name == SITES_SECTION:
            site_tables = _sites_from_tables(table, base_dir=base, problems=problems)
        else:
            problems.append(unknown_section_problem(name))
    run_values = values.get("federation", {})
    site_count = run_values.pop("sites", None)
    run_table = mapping.get("federation")
    given_count = isinstance(run_table, Mapping) and "sites" in run_table
    sites: tuple[SiteSpec, ...] | None = None
    if given_count and SITES_SECTION in mapping:
        problems.append("sites are given twice: `sites = N` in [federation] and [[sites]] tables; keep one")
    elif site_count is not None:
        if not 2 <= site_count <= MAX_SITES:
            problems.append(f"[federation] sites must be between 2 and {MAX_SITES}, got {site_count}")
        else:
            sites = numbered_sites(site_count)
    elif SITES_SECTION in mapping:
        sites = site_tables
    elif not given_count:
        sites = numbered_sites(DEFAULT_SITES)
    built: dict[str, Any] = {}
    for name, cls in _SECTION_CLASSES.items():
        built[name] = _build(f"[{name}]", cls, run_values if name == "federation" else values.get(name, {}), problems)
    data = built.get("data")
    if not given_count and SITES_SECTION not in mapping and data is not None and data.split is SplitKind.BY_FOLDER:
        try:  # one hospital per sub-folder, named after it, unless the sites are given
            sites = tuple(SiteSpec(name=name) for name in folder_site_names(data))
        except ConfigError as error:
            problems.extend(prefixed("[data]", error.problems))
            sites = None
    if sites is not None:  # checked here too, so these problems join the others
        run = built["federation"]
        problems += _federation_problems(run, sites) if run is not None else _site_list_problems(sites)
    if problems or sites is None or any(v is None for v in built.values()):
        if not problems:  # pragma: no cover - every None above recorded a problem
            problems.append("the config could not be read")
        problems += _section_checks(built, sites, values.get("he", {}))
        raise ConfigError(problems)
    return FederationConfig(sites=sites, **built)


def _section_checks(built: dict[str, Any], sites: tuple[SiteSpec, ...] | None, raw_he: Any) -> list[str]:
    """The checks ``validate`` would run on the sections that did parse, so that a config with a
    typo elsewhere still hears about its missing data file, unfit model or HE settings that do
    not fit the cohort in the same message."""
    from securefed.data import data_problems
    from securefed.federation.config_checks import he_problems, known_spec
    from securefed.models import model_problems

    secagg = built.get("secagg")
    found: list[str] = he_problems(run=built.get("federation"), sites=sites, he=built.get("he"),
                                   raw_he=raw_he if isinstance(raw_he, dict) else {}, site_dp=built.get("site_dp"),
                                   bit_width=secagg.bit_width if secagg is not None else 32)
    data, model = built.get("data"), built.get("model")
    if data is not None and sites is not None:
        found += prefixed("[data]", data_problems(data, sites=[s.name for s in sites]))
    spec = known_spec(data) if data is not None else None
    if model is not None and spec is not None:
        found += prefixed("[model]", model_problems(model, spec))
    return found


def load_config(path: str | Path) -> FederationConfig:
    """Read a TOML config file; relative paths in it are read from the file's folder."""
    target = Path(path)
    try:
        text = target.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {target} does not exist; write an example with "
                          f"`securefed init {target}`") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {target} is a directory, not a TOML file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {target} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {target}: {error.strerror or type(error).__name__}") from None
    try:
        mapping = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(f"{target} is not valid TOML: {error}") from None
    try:
        return parse_config(mapping, base_dir=target.absolute().parent)
    except ConfigError as error:
        raise ConfigError([f"{target}: {p}" for p in error.problems]) from None


# -- writing -------------------------------------------------------------------------------------

def _toml_value(key: Key, value: Any) -> Any:
    if value is None:
        return list(key.unset) if isinstance(key.unset, list) else key.unset
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def config_to_dict(config: FederationConfig) -> dict[str, Any]:
    """The config as a TOML-shaped dict of plain values (None written as each key's unset value).

    ``parse_config(config_to_dict(c)) == c`` for any config read from a file or mapping (whose
    paths are absolute); ``dumps_toml`` turns it into TOML text.
    """
    document: dict[str, Any] = {}
    numbered = config.sites == numbered_sites(len(config.sites))
    for section, keys in SECTIONS.items():
        obj = config.federation if section == "federation" else getattr(config, section)
        table = {}
        for name, key in keys.items():
            if section == "federation" and name == "sites":
                if numbered:
                    table[name] = len(config.sites)
                continue
            value = getattr(obj, name)
            if value is None and not key.has_unset:
                continue
            table[name] = _toml_value(key, value)
        document[section] = table
    if not numbered:
        document[SITES_SECTION] = [
            {"name": s.name, **{k: _toml_value(SITE_KEYS[k], getattr(s, k)) for k in SITE_KEYS
                                if k != "name" and getattr(s, k) is not None}}
            for s in config.sites
        ]
    return document
