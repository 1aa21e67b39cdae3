"""Writing a config back: dumps_toml reads back with tomllib, and configs survive the round trip."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.data import DataConfig
from securefed.federation.config import (
    FederationConfig,
    PrivacySettings,
    RunSettings,
    SecAggSettings,
    SiteSpec,
    EvaluationSettings,
    config_to_dict,
    default_config,
    dumps_toml,
    load_config,
    parse_config,
)
from securefed.federation.config_schema import SECTIONS, SITE_KEYS
from securefed.federation.training_settings import TrainingSettings
from securefed.models import ModelConfig

_CLASSES = {"federation": RunSettings, "secagg": SecAggSettings, "data": DataConfig, "model": ModelConfig,
            "training": TrainingSettings, "privacy": PrivacySettings, "evaluation": EvaluationSettings}


def test_schema_lists_exactly_the_dataclass_fields() -> None:
    # A field added to a section's dataclass must get a key (and so a line in the example file).
    for section, cls in _CLASSES.items():
        keys = set(SECTIONS[section]) - ({"sites"} if section == "federation" else set())
        assert keys == {f.name for f in dataclasses.fields(cls)}, section
    assert set(SITE_KEYS) == {f.name for f in dataclasses.fields(SiteSpec)}
    assert set(SECTIONS) == {f.name for f in dataclasses.fields(FederationConfig)} - {"sites"}


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalar = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False), _text)
_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)
_table = st.dictionaries(_names, st.one_of(_scalar, st.lists(_scalar, max_size=4)), max_size=5)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_names, st.one_of(_table, st.lists(_table, min_size=1, max_size=3)), max_size=4))
def test_dumps_toml_reads_back_equal(document: dict) -> None:
    assert tomllib.loads(dumps_toml(document)) == document


def test_dumps_toml_special_floats_and_refusals() -> None:
    read = tomllib.loads(dumps_toml({"t": {"a": math.inf, "b": -math.inf, "c": 1e-05, "d": 1e300}}))
    assert read["t"] == {"a": math.inf, "b": -math.inf, "c": 1e-05, "d": 1e300}
    assert math.isnan(tomllib.loads(dumps_toml({"t": {"n": math.nan}}))["t"]["n"])
    for bad in ({"t": {"deep": {"x": 1}}}, {"t": {"none": None}}, {"t": {"p": Path("x")}}, {"t": {1: 2}}):
        with pytest.raises(TypeError):
            dumps_toml(bad)


def _round_trip(config: FederationConfig, tmp_path: Path) -> None:
    document = config_to_dict(config)
    assert parse_config(document) == config
    path = tmp_path / "written.toml"
    path.write_text(dumps_toml(document), encoding="utf-8")
    assert load_config(path) == config


def test_default_config_round_trips(tmp_path: Path) -> None:
    _round_trip(default_config(), tmp_path)


def test_varied_configs_round_trip(tmp_path: Path) -> None:
    npz = tmp_path / "data" / "scans.npz"
    cases = [
        {"sites": [{"name": "st-thomas", "epsilon_budget": 5.5}, {"name": "leeds"}, {"name": "x.1_b"}],
         "privacy": {"enabled": False, "noise_multiplier": 1.25, "accountant": "pld", "clipping": "fast"}},
        {"federation": {"rounds": 9, "sites": 6, "aggregation": "plain", "seed": 3, "sites_per_round": 4,
                        "workers": 2},
         "secagg": {"neighbors": 4, "threshold": 3, "bit_width": 64, "clip": 0.25},
         "data": {"kind": "medmnist", "path": str(npz), "split": "dirichlet", "alpha": 0.1, "image_size": 32},
         "model": {"name": "densenet121"},
         "training": {"optimizer": "adam", "momentum": 0.5, "steps_per_round": 4, "max_physical_batch_size": 2,
                      "device": "cuda:1"},
         "evaluation": {"every": 3}},
        {"data": {"kind": "synthetic-seg3d", "samples": 40, "image_size": 16},
         "model": {"name": "segresnet", "features": [4, 8, 16]},
         "training": {"epochs_per_round": 0.5, "learning_rate": 0.01},
         "privacy": {"budget_epsilon": 4, "target_epsilon": 2, "delta": 1e-7}},
        {"model": {"factory": "my_lab.nets:build"}, "secagg": {"neighbors": "all"}},
    ]
    for case in cases:
        _round_trip(parse_config(case), tmp_path)


@settings(max_examples=40, deadline=None)
@given(
    rounds=st.integers(1, 1000), seed=st.integers(0, 2**32), count=st.integers(2, 12),
    budgets=st.lists(st.one_of(st.none(), st.floats(0.1, 50)), min_size=2, max_size=5),
    named=st.booleans(), lr=st.floats(1e-5, 10), batch=st.integers(1, 512),
    epsilon=st.floats(0.1, 20), delta=st.floats(1e-12, 0.5), noise=st.one_of(st.none(), st.floats(0.3, 10)),
    hidden=st.lists(st.integers(1, 256), min_size=1, max_size=3), every=st.integers(1, 10),
)
def test_generated_configs_round_trip(rounds, seed, count, budgets, named, lr, batch, epsilon, delta, noise,
                                      hidden, every) -> None:
    sites = (tuple(SiteSpec(name=f"h{i}", epsilon_budget=b) for i, b in enumerate(budgets)) if named
             else tuple(SiteSpec(name=f"site-{i}") for i in range(1, count + 1)))
    config = FederationConfig(
        federation=RunSettings(rounds=rounds, seed=seed), sites=sites,
        training=TrainingSettings(learning_rate=lr, batch_size=batch),
        privacy=PrivacySettings(target_epsilon=epsilon, delta=delta, noise_multiplier=noise),
        model=ModelConfig(hidden=tuple(hidden)), evaluation=EvaluationSettings(every=every),
    )
    document = config_to_dict(config)
    assert parse_config(tomllib.loads(dumps_toml(document))) == config
    assert ("sites" in document) == named and ("sites" in document["federation"]) != named
