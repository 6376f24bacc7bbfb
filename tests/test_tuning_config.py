"""Config files of the ``hypergrad`` command: unknown keys, types, ranges and hyperparameter bounds."""
from pathlib import Path

import pytest

from lrnn.tuning.config import Config, ConfigError, from_dict, load_config

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.toml"))


def test_example_configs_are_valid_and_round_trip():
    assert EXAMPLES, "examples/configs/*.toml missing"
    for path in EXAMPLES:
        config = load_config(path)
        assert from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "values, key, listed",
    [
        ({"outer": {"lrr": 0.1}}, "outer.lrr", "lr"),
        ({"runn": {}}, "runn", "outer"),
        ({"hyper": {"eigenscale": {"tune": True}}}, "hyper.eigenscale", "eigen_scale"),
        ({"hyper": {"eigen_scale": {"tuned": True}}}, "hyper.eigen_scale.tuned", "fix_first"),
        ({"search": {"space": {"n_h": [1, 2]}}}, "search.space.n_h", "num_householder"),
    ],
)
def test_unknown_keys_are_named_with_the_valid_ones(values, key, listed):
    with pytest.raises(ConfigError) as error:
        from_dict(values)
    message = str(error.value)
    assert repr(key) in message and listed in message and "valid keys" in message


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"hyper": {"eigen_scale": {"init": 2.5}}}, "eigen_scale"),
        ({"hyper": {"eigen_scale": {"bounds": [0.5, 2.0], "init": 1.0}}}, "eigen_scale"),
        ({"hyper": {"step_gates": {"bounds": [0.0, 1.5]}}}, "step_gates"),
        ({"hyper": {"lr": {"bounds": [0.0, 0.1]}}}, "lr"),
        ({"hyper": {"weight_decay": {"init": -0.1, "bounds": [-1.0, 1.0]}}}, "weight_decay"),
        ({"hyper": {"beta_bias": {"bounds": [1.0, -1.0]}}}, "beta_bias"),
        ({"hyper": {"eigen_scale": {"per": "token"}}}, "per"),
        ({"outer": {"lr": "fast"}}, "outer.lr"),
        ({"outer": {"lr": -1.0}}, "outer.lr"),
        ({"run": {"progress": 1}}, "run.progress"),
        ({"task": {"name": "S7"}}, "task.name"),
        ({"model": {"qk_activation": "relu"}}, "model.qk_activation"),
        ({"search": {"workers": 0}}, "search.workers"),
        ({"task": {"train_len": [40, 3]}}, "task.train_len"),
        ({"outer": {"method": "aid"}, "hyper": {"lr": {"tune": True}}}, "ITD"),
        ({"inner": {"steps": 2}, "outer": {"truncate": 3}}, "outer.truncate"),
        ({"search": {"space": {"num_householder": [1, 2]}}, "hyper": {"step_gates": {"init": [1.0, 0.5, 0.5]}}},
         "step_gates"),
    ],
)
def test_bad_values_and_bounds_are_rejected(values, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(values)


def test_defaults_and_toml_loading(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[outer]\nsteps = 3\n[hyper.eigen_scale]\ntune = true\ninit = 1.0\n')
    config = load_config(path)
    assert config.outer.steps == 3 and config.hyper["eigen_scale"].tune and config.search is None
    assert config.hyper["lr"].init == Config().hyper["lr"].init
    path.write_text("[outer\n")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(path)
