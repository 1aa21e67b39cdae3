"""Reading a federation config: defaults, every kind of bad input, all problems at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefed.errors import ConfigError
from securefed.federation.config import (
    Aggregation,
    FederationConfig,
    PrivacySettings,
    SiteSpec,
    default_config,
    load_config,
    parse_config,
    validate,
)
from securefed.federation.training_settings import Optimizer, TrainingSettings


def problems_of(mapping: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(mapping, **kwargs)
    return caught.value.problems


def one_problem(mapping: dict) -> str:
    problems = problems_of(mapping)
    assert len(problems) == 1, problems
    return problems[0]


def test_default_config_is_the_empty_file() -> None:
    config = default_config()
    assert parse_config({}) == config
    assert config.federation.rounds == 5
    assert config.federation.aggregation is Aggregation.SECAGG
    assert config.site_names() == ["site-1", "site-2", "site-3", "site-4"]
    assert config.data.kind.value == "breast-cancer"
    assert config.privacy.enabled and config.privacy.target_epsilon == 3.0 and config.privacy.delta == 1e-5
    assert config.training.optimizer is Optimizer.SGD


def test_values_are_read_and_converted() -> None:
    config = parse_config({
        "federation": {"rounds": 2, "sites": 3, "aggregation": "plain", "seed": 7},
        "secagg": {"neighbors": "all", "threshold": 0, "clip": 2},
        "model": {"hidden": [32, 16], "features": []},
        "training": {"optimizer": "adam", "learning_rate": 1, "steps_per_round": 0, "epochs_per_round": 2},
        "privacy": {"target_epsilon": 8, "noise_multiplier": 0, "budget_epsilon": 10, "accountant": "pld"},
    })
    assert config.federation.rounds == 2 and config.federation.aggregation is Aggregation.PLAIN
    assert config.site_names() == ["site-1", "site-2", "site-3"]
    assert config.secagg.threshold is None and config.secagg.clip == 2.0 and type(config.secagg.clip) is float
    assert config.model.hidden == (32, 16) and config.model.features is None
    assert config.training.optimizer is Optimizer.ADAM
    assert type(config.training.learning_rate) is float and config.training.steps_per_round is None
    assert config.training.epochs_per_round == 2.0
    assert config.privacy.noise_multiplier is None and config.privacy.budget_epsilon == 10.0
    assert type(config.privacy.target_epsilon) is float
    assert config.privacy.accountant.value == "pld"


def test_unknown_key_suggests_the_nearest() -> None:
    assert one_problem({"federation": {"rounsd": 3}}) == \
        "unknown key 'rounsd' in [federation]; did you mean 'rounds'?"
    assert "did you mean 'epsilon_budget'?" in one_problem({"sites": [{"name": "a", "epsilon_budgte": 1},
                                                                      {"name": "b"}]})


def test_key_in_the_wrong_section_names_its_home() -> None:
    assert one_problem({"federation": {"target_epsilon": 2}}) == \
        "unknown key 'target_epsilon' in [federation]; it belongs in [privacy]"
    assert one_problem({"rounds": 3}) == "'rounds' is outside any section; put it under [federation]"


def test_unknown_section_suggests_the_nearest() -> None:
    assert one_problem({"privcy": {"enabled": False}}) == "unknown section [privcy]; did you mean [privacy]?"
    assert "[federation]" in one_problem({"zzz": {}})


@pytest.mark.parametrize(("mapping", "expected"), [
    ({"federation": {"rounds": "5"}}, '[federation] rounds must be an integer, got the string "5"'),
    ({"federation": {"rounds": True}}, "[federation] rounds must be an integer, got the boolean true"),
    ({"federation": {"seed": 1.5}}, "[federation] seed must be an integer, got the float 1.5"),
    ({"privacy": {"delta": "1e-5"}}, '[privacy] delta must be a number, got the string "1e-5"'),
    ({"privacy": {"enabled": 1}}, "[privacy] enabled must be true or false, got the integer 1"),
    ({"model": {"hidden": 64}}, "[model] hidden must be an array of integers, got the integer 64"),
    ({"model": {"hidden": [64, "32"]}}, "[model] hidden must be an array of integers, got an array holding string"),
    ({"data": {"path": 3}}, "[data] path must be a string (a file or folder path), got the integer 3"),
    ({"secagg": {"neighbors": 2.0}}, '[secagg] neighbors must be "auto", "all" or an even integer, got the float 2.0'),
    ({"evaluation": {"every": [1]}}, "[evaluation] every must be an integer, got an array"),
    ({"federation": "rounds"}, "[federation] must be a table of keys, got str"),
])
def test_wrong_types_name_key_expected_and_given(mapping: dict, expected: str) -> None:
    assert one_problem(mapping) == expected


@pytest.mark.parametrize(("mapping", "allowed"), [
    ({"federation": {"aggregation": "secure"}}, ['"secagg"', '"he"', '"plain"']),
    ({"training": {"optimizer": "rmsprop"}}, ["'sgd'", "'adam'"]),
    ({"privacy": {"accountant": "moments"}}, ["rdp", "pld"]),
    ({"privacy": {"clipping": "fastest"}}, ["per-sample", "ghost", "fast", "auto"]),
    ({"secagg": {"neighbors": "some"}}, ['"auto"', '"all"', "even integer"]),
    ({"data": {"kind": "mnist"}}, ["breast-cancer", "medmnist", "image-folder"]),
])
def test_bad_enum_value_lists_the_allowed_values(mapping: dict, allowed: list[str]) -> None:
    problem = one_problem(mapping)
    key, value = next(iter(next(iter(mapping.values())).items()))
    assert repr(value) in problem and key in problem, problem
    for choice in allowed:
        assert choice in problem, problem


def test_he_settings_report_every_problem_with_its_fix() -> None:
    problems = problems_of({"federation": {"aggregation": "he"},
                            "he": {"coeff_mod_bit_sizes": [60, 60], "min_sites": 1, "clip": -1}})
    assert any("128-bit" in p and "[he]" in p for p in problems), problems
    assert any("min_sites" in p and "show its update" in p for p in problems), problems
    assert any("clip" in p for p in problems), problems
    assert parse_config({"federation": {"aggregation": "he"}}).federation.aggregation is Aggregation.HE


def test_he_problems_that_need_the_cohort_are_reported_with_the_others() -> None:
    problems = problems_of({"federation": {"aggregation": "he", "sites": 3}, "training": {"learning_rate": -1},
                            "he": {"clip": -1, "min_sites": 9, "dealer": "nobody"}})
    for fragment in ("learning_rate", "clip", "min_sites = 9 is more than the 3 sites", "'nobody' is not one"):
        assert any(fragment in p for p in problems), (fragment, problems)


def test_an_he_sum_that_cannot_fit_says_what_can_be_changed() -> None:
    config = parse_config({"federation": {"aggregation": "he", "sites": 3}, "he": {"clip": 1e30}})
    with pytest.raises(ConfigError) as error:
        validate(config)
    (problem,) = error.value.problems
    assert "3 sites" in problem and "lower clip" in problem and "scale_bits to at most" not in problem


def test_named_sites_with_budgets() -> None:
    config = parse_config({"sites": [{"name": "st-thomas", "epsilon_budget": 2}, {"name": "addenbrookes"},
                                     {"name": "leeds_1.a", "epsilon_budget": 0}]})
    assert config.site_names() == ["st-thomas", "addenbrookes", "leeds_1.a"]
    assert config.sites[0] == SiteSpec(name="st-thomas", epsilon_budget=2.0)
    assert config.sites[1].epsilon_budget is None and config.sites[2].epsilon_budget is None


def test_duplicate_site_names() -> None:
    problems = problems_of({"sites": [{"name": "a"}, {"name": "b"}, {"name": "a"}, {"name": "B"}]})
    assert any("'a' appears 2 times" in p for p in problems), problems
    assert any("'b' and 'B' differ only in case" in p for p in problems), problems


@pytest.mark.parametrize("name", ["st thomas", "../evil", ".hidden", "", "a/b", "x" * 65, "é"])
def test_unsafe_site_names_are_refused(name: str) -> None:
    problem = one_problem({"sites": [{"name": name}, {"name": "ok"}]})
    assert problem.startswith("[[sites]] entry 1 ") and "site name" in problem


def test_site_table_without_a_name() -> None:
    assert one_problem({"sites": [{"epsilon_budget": 1.0}, {"name": "b"}]}) == \
        '[[sites]] entry 1 has no name; add name = "..." (letters, digits, - _ .)'


def test_site_count_and_site_tables_together_are_refused() -> None:
    problem = one_problem({"federation": {"sites": 2}, "sites": [{"name": "a"}, {"name": "b"}]})
    assert "given twice" in problem and "keep one" in problem


@pytest.mark.parametrize(("mapping", "fragment"), [
    ({"federation": {"sites": 1}}, "[federation] sites must be between 2 and"),
    ({"federation": {"sites": 10**9}}, "[federation] sites must be between 2 and"),
    ({"sites": [{"name": "only"}]}, "at least 2 sites, got 1"),
    ({"sites": []}, "at least 2 sites, got 0"),
    ({"sites": 3}, "to give a count write sites = N under [federation]"),
    ({"federation": {"sites": 3, "sites_per_round": 4}}, "sites_per_round = 4 is more than the 3 sites"),
    ({"federation": {"sites": 3, "workers": 5}}, "workers = 5 is more than the 3 sites"),
    ({"federation": {"rounds": 0}}, "[federation] rounds must be an integer >= 1, got 0"),
    ({"federation": {"seed": -1}}, "[federation] seed must be an integer >= 0"),
    ({"privacy": {"budget_epsilon": -1}}, "[privacy] budget_epsilon must be a finite number > 0 (or 0 for "
                                          "target_epsilon), got -1.0"),
    ({"privacy": {"target_epsilon": 0}}, "[privacy] target_epsilon must be a finite number > 0"),
    ({"privacy": {"delta": 1.5}}, "[privacy] delta must be a number in (0, 1)"),
    ({"privacy": {"noise_multiplier": -2}}, "[privacy] noise_multiplier must be a finite number > 0"),
    ({"secagg": {"threshold": 1}}, "[secagg] threshold must be an integer >= 2"),
    ({"secagg": {"neighbors": 3}}, '[secagg] neighbors must be "auto", "all" or an even integer >= 2, got 3'),
    ({"secagg": {"bit_width": 16}}, "bit_width must be 32 or 64"),
    ({"secagg": {"clip": -1}}, "clip must be a finite positive number"),
    ({"training": {"epochs_per_round": 1, "steps_per_round": 5}}, "at most one of epochs_per_round or steps_per_round"),
    ({"training": {"device": "gpu"}}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ({"training": {"momentum": 1.0}}, "momentum must be a number in [0, 1)"),
    ({"training": {"batch_size": 0}}, "batch_size must be an int >= 1"),
    ({"evaluation": {"every": 0}}, "[evaluation] every must be an integer >= 1"),
    ({"data": {"kind": "medmnist"}}, "data.path is required for kind 'medmnist'"),
    ({"sites": [{"name": "a", "epsilon_budget": -3}, {"name": "b"}]}, "[[sites]] entry 1 epsilon_budget must be"),
])
def test_bad_values_are_reported(mapping: dict, fragment: str) -> None:
    problems = problems_of(mapping)
    assert any(fragment in p for p in problems), problems


def test_every_problem_of_every_section_is_reported_at_once() -> None:
    problems = problems_of({
        "federation": {"rounsd": 3, "aggregation": "he"},
        "he": {"poly_modulus_degree": 1000},
        "secagg": {"bit_width": "32"},
        "data": {"kind": "medmnist"},
        "training": {"optimizer": "rmsprop"},
        "privacy": {"budget_epsilon": -1, "delta": 2.0},
        "sites": [{"name": "a"}, {"name": "a"}],
        "evaluaton": {},
    })
    fragments = ["'rounsd'", "poly_modulus_degree", "bit_width", "data.path is required", "'rmsprop'", "budget_epsilon",
                 "delta", "'a' appears 2 times", "did you mean [evaluation]"]
    for fragment in fragments:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == len(fragments)


def test_load_config_reads_a_file_and_resolves_paths_against_it(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "run.toml").write_text('[data]\nkind = "medmnist"\npath = "scans/pneumonia.npz"\n'
                                     '[federation]\nrounds = 2\n')
    config = load_config(folder / "run.toml")
    assert config.data.path == folder / "scans" / "pneumonia.npz"
    assert config.federation.rounds == 2
    absolute = tmp_path / "elsewhere.npz"
    (folder / "abs.toml").write_text(f'[data]\nkind = "medmnist"\npath = "{absolute.as_posix()}"\n')
    assert load_config(folder / "abs.toml").data.path == absolute


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[federation]\nrounds = = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "not valid TOML" in message and "line 2" in message and "column" in message


def test_load_config_problems_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nrounsd = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: unknown key 'rounsd' in [federation]; did you mean 'rounds'?"]


def test_missing_or_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; write an example with `securefed init"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin1.toml")


def test_secagg_config_for_the_protocol() -> None:
    config = parse_config({"secagg": {"neighbors": "all", "threshold": 3, "bit_width": 64, "clip": 0.5}})
    secagg = config.secagg_config()
    assert (secagg.neighbors, secagg.threshold, secagg.bit_width, secagg.clip, secagg.max_weight) == \
        (None, 3, 64, 0.5, 1.0)
    assert parse_config({"secagg": {"neighbors": 4}}).secagg_config().neighbors == 4
    assert default_config().secagg_config().neighbors == "auto"


def test_dpsgd_config_maps_privacy_and_training() -> None:
    training = TrainingSettings(batch_size=8, steps_per_round=3, max_physical_batch_size=4, device="cpu")
    privacy = PrivacySettings(target_epsilon=2.0, delta=1e-6, max_grad_norm=0.5, accountant="pld",
                              clipping="per-sample")
    dp = privacy.dpsgd_config(training, rounds=7)
    assert (dp.target_epsilon, dp.noise_multiplier, dp.delta, dp.max_grad_norm) == (2.0, None, 1e-6, 0.5)
    assert (dp.batch_size, dp.steps_per_round, dp.epochs_per_round, dp.max_physical_batch_size) == (8, 3, None, 4)
    assert (dp.planned_rounds, dp.device, dp.accountant.value, dp.clipping.value) == (7, "cpu", "pld", "per-sample")
    fixed = PrivacySettings(noise_multiplier=1.3).dpsgd_config(TrainingSettings(epochs_per_round=2), rounds=1)
    assert fixed.noise_multiplier == 1.3 and fixed.target_epsilon is None and fixed.epochs_per_round == 2.0
    assert PrivacySettings(enabled=False).dpsgd_config(training, rounds=3) is None


def test_budget_for_prefers_the_site_then_the_federation_then_the_target() -> None:
    site, own = SiteSpec(name="a"), SiteSpec(name="b", epsilon_budget=1.5)
    assert PrivacySettings(target_epsilon=3.0).budget_for(site).epsilon == 3.0
    assert PrivacySettings(target_epsilon=3.0, budget_epsilon=4.0).budget_for(site).epsilon == 4.0
    budget = PrivacySettings(target_epsilon=3.0, budget_epsilon=4.0, delta=1e-6).budget_for(own)
    assert (budget.epsilon, budget.delta) == (1.5, 1e-6)


def test_python_construction_accepts_strings_and_checks_sites() -> None:
    config = FederationConfig(sites=("north", "south"))
    assert config.sites == (SiteSpec(name="north"), SiteSpec(name="south"))
    assert config.cohort_size() == 2
    with pytest.raises(ConfigError, match="at least 2 sites"):
        FederationConfig(sites=("north",))
    with pytest.raises(ConfigError, match="optimizer must be one of 'sgd', 'adam'"):
        TrainingSettings(optimizer="lbfgs")
