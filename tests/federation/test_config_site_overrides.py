"""A hospital's own local training and DP-SGD settings in its [[sites]] table."""

from __future__ import annotations

import pytest

from securefed.errors import ConfigError
from securefed.federation.config import config_to_dict, parse_config
from securefed.federation.training_settings import Optimizer


def _config(**site):
    return parse_config({
        "training": {"epochs_per_round": 2.0, "learning_rate": 0.1},
        "privacy": {"target_epsilon": 3.0, "budget_epsilon": 6.0},
        "sites": [{"name": "kings", **site}, {"name": "guys"}],
    })


def test_a_site_s_values_override_the_federation_s_and_only_for_that_site():
    config = _config(learning_rate=0.02, optimizer="adam", steps_per_round=7, target_epsilon=1.5)
    kings, guys = config.training_for("kings"), config.training_for("guys")
    assert (kings.learning_rate, kings.optimizer, kings.steps_per_round, kings.epochs_per_round) == \
        (0.02, Optimizer.ADAM, 7, None)  # its own round length replaces the federation's
    assert (guys.learning_rate, guys.optimizer, guys.steps_per_round, guys.epochs_per_round) == \
        (0.1, Optimizer.SGD, None, 2.0)
    assert config.privacy_for("kings").target_epsilon == 1.5 and config.privacy_for("guys").target_epsilon == 3.0
    kings_dp = config.privacy_for("kings").dpsgd_config(kings, 4)
    assert kings_dp.steps_per_round == 7 and kings_dp.target_epsilon == 1.5
    assert parse_config(config_to_dict(config)) == config


def test_a_site_s_own_noise_multiplier_replaces_calibration_there_only():
    config = _config(noise_multiplier=1.3)
    assert config.privacy_for("kings").dpsgd_config(config.training_for("kings"), 3).noise_multiplier == 1.3
    assert config.privacy_for("guys").dpsgd_config(config.training_for("guys"), 3).target_epsilon == 3.0


def test_bad_site_values_are_reported_with_the_site_s_name_and_all_at_once():
    with pytest.raises(ConfigError) as caught:
        _config(batch_size=0, optimizer="adagrad", max_grad_norm=-1.0)
    text = str(caught.value)
    assert "kings" in text and "batch_size" in text and "adagrad" in text and "max_grad_norm" in text
    assert len(caught.value.problems) >= 3


def test_a_site_target_above_the_budget_is_refused():
    from securefed.federation.config import validate

    config = parse_config({"privacy": {"target_epsilon": 3.0, "budget_epsilon": 3.0},
                           "sites": [{"name": "kings", "target_epsilon": 5.0}, {"name": "guys"}]})
    with pytest.raises(ConfigError, match=r"kings \(3\) is below target_epsilon = 5"):
        validate(config)


def test_unknown_site_keys_suggest_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        parse_config({"sites": [{"name": "kings", "learning_rat": 0.1}, {"name": "guys"}]})


@pytest.mark.parametrize("bad", [{"sites": [{"name": "kings\n"}, {"name": "guys"}]},
                                 {"training": {"device": "cpu\n"}}])
def test_a_trailing_newline_does_not_sneak_past_a_pattern(bad):
    # A site name becomes a directory name; "$" in a regular expression also matches before "\n".
    with pytest.raises(ConfigError):
        parse_config(bad)
