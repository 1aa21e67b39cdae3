"""validate(): the checks across sections that need no data loading, every problem at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from securefed.errors import ConfigError
from securefed.federation.config import default_config, parse_config, validate


def validation_problems(mapping: dict, **kwargs) -> list[str]:
    config = parse_config(mapping, **kwargs)  # a config that reads fine ...
    with pytest.raises(ConfigError) as caught:
        validate(config)  # ... but cannot run
    return caught.value.problems


def test_the_default_config_validates_quickly() -> None:
    start = time.perf_counter()
    validate(default_config())
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("mapping", [
    {"federation": {"aggregation": "plain", "sites": 2}},
    {"federation": {"aggregation": "plain", "sites_per_round": 1}},  # no secure aggregation to satisfy
    {"federation": {"sites": 5, "sites_per_round": 3}, "secagg": {"threshold": 3}},
    {"privacy": {"enabled": False, "budget_epsilon": 1}},
    {"privacy": {"noise_multiplier": 1.1, "budget_epsilon": 1}},  # fixed noise: the ledger stops the run
    {"data": {"kind": "synthetic-seg2d", "samples": 40, "image_size": 32}, "model": {"name": "unet"}},
])
def test_valid_variants(mapping: dict) -> None:
    validate(parse_config(mapping))


def test_threshold_above_the_cohort_is_reported() -> None:
    problems = validation_problems({"federation": {"sites": 3}, "secagg": {"threshold": 5}})
    assert problems == ["[secagg] with 3 sites per round: threshold 5 is more than the 3 sites of a "
                        "neighbourhood; lower threshold or add neighbours"]


def test_threshold_checked_against_sites_per_round_not_all_sites() -> None:
    problems = validation_problems({"federation": {"sites": 8, "sites_per_round": 3}, "secagg": {"threshold": 4}})
    assert len(problems) == 1 and "with 3 sites per round: threshold 4" in problems[0]


def test_one_site_per_round_cannot_be_securely_aggregated() -> None:
    problems = validation_problems({"federation": {"sites_per_round": 1}})
    assert problems == ['[secagg] secure aggregation needs at least 2 sites per round, but sites_per_round = 1; '
                        'raise sites_per_round (or 0 for every site) or use aggregation = "plain"']


def test_budgets_below_the_calibrated_target_are_reported() -> None:
    (problem,) = validation_problems({"privacy": {"target_epsilon": 3, "budget_epsilon": 2}})
    assert "budget_epsilon = 2 is below target_epsilon = 3" in problem
    (problem,) = validation_problems({"sites": [{"name": "a", "epsilon_budget": 1}, {"name": "b"},
                                                {"name": "c", "epsilon_budget": 2.5}]})
    assert "a (1), c (2.5)" in problem and "below target_epsilon = 3" in problem


def test_data_problems_are_reported(tmp_path: Path) -> None:
    problems = validation_problems({"data": {"kind": "medmnist", "path": "missing.npz"}}, base_dir=tmp_path)
    assert any("missing.npz" in p and "does not exist" in p for p in problems), problems
    problems = validation_problems({"federation": {"sites": 300, "aggregation": "plain"}})
    assert any("breast-cancer" in p and "300 sites" in p for p in problems), problems


def test_model_problems_are_reported_for_embedded_tasks() -> None:
    problems = validation_problems({"data": {"kind": "synthetic-seg2d"}, "model": {"name": "densenet121"}})
    assert any(p.startswith("[model]") and "segmentation" in p for p in problems), problems
    problems = validation_problems({"model": {"name": "unet"}})  # breast cancer is classification
    assert any(p.startswith("[model]") and "classification" in p for p in problems), problems


def test_problems_of_every_check_come_together() -> None:
    problems = validation_problems({
        "federation": {"sites": 3},
        "secagg": {"threshold": 4},
        "model": {"name": "segresnet"},
        "privacy": {"budget_epsilon": 1},
    })
    assert [p.split(" ")[0] for p in problems] == ["[model]", "[secagg]", "[privacy]"], problems


def test_a_typo_elsewhere_does_not_hide_the_data_and_model_problems(tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse_config({"federation": {"rounsd": 2}, "data": {"kind": "medmnist", "path": "missing.npz"}},
                     base_dir=tmp_path)
    text = str(caught.value)
    assert "did you mean 'rounds'" in text and "missing.npz" in text
    with pytest.raises(ConfigError) as caught:
        parse_config({"federation": {"rounsd": 2}, "model": {"name": "unet"}})
    assert "did you mean 'rounds'" in str(caught.value) and "unet" in str(caught.value)
