import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import RunConfig, config_fields, parse_run_config_string
from server.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]


def test_cli_and_run_config_give_the_same_config(tmp_path):
    from_run_config = RunConfig.from_mapping(
        parse_run_config_string("lr=0.005 local-steps=3 strategy='fedprox' proximal-mu=0.1"))
    args = build_parser().parse_args(
        ["simulate", "--lr", "0.005", "--local-steps", "3", "--strategy", "fedprox",
         "--proximal-mu", "0.1"])
    assert config_from_args(args) == from_run_config
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.005\nlocal-steps = 3\nstrategy = "fedprox"\nproximal-mu = 0.1\n')
    args = build_parser().parse_args(["simulate", "--run-config", str(toml)])
    assert config_from_args(args) == from_run_config
    assert from_run_config.lr == 0.005 and from_run_config.local_steps == 3


def test_flags_override_run_config_string():
    args = build_parser().parse_args(["simulate", "--run-config", "lr=0.1", "--lr", "0.2"])
    assert config_from_args(args).lr == 0.2


def test_pyproject_defaults_match_the_dataclass():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        app_config = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(app_config) == RunConfig()
    assert set(app_config) == {key for key, _, _ in config_fields()}


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ValueError, match="unknown config key 'local-step'; did you mean 'local-steps'"):
        RunConfig.from_mapping({"local-step": 3})


@pytest.mark.parametrize("values, message", [
    ({"lr": "fast"}, "'lr' expects float"),
    ({"local-steps": "2.5"}, "'local-steps' expects int"),
    ({"local-steps": 0}, "'local-steps' must be >= 1"),
    ({"lora-dropout": 1.5}, "'lora-dropout' must be in"),
    ({"strategy": "fedbest"}, "'strategy' must be one of"),
    ({"strategy": "fedprox"}, "'proximal-mu' is 0"),
    ({"min-train-clients": 9}, "exceeds 'num-clients'"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_mapping(values)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([k for k, _, _ in config_fields()]),
                       st.one_of(st.text(max_size=8), st.integers(-5, 5),
                                 st.floats(allow_nan=False, width=32)), max_size=4))
def test_parser_only_raises_value_error(values):
    """Whatever comes in, the parser either builds a config or names the problem."""
    try:
        cfg = RunConfig.from_mapping(values)
    except ValueError as err:
        assert "config" in str(err)
    else:
        assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _, _ in config_fields() if f"| `{key}` |" not in readme]
    assert not missing, f"README's config reference lacks {missing}"


@pytest.mark.parametrize("argv, expected", [
    ([], False),
    (["--tensorboard"], True),
    (["--tensorboard", "false"], False),
    (["--tensorboard", "1"], True),
    (["--run-config", "tensorboard=true"], True),
    (["--run-config", "tensorboard=true", "--tensorboard", "no"], False),
])
def test_bool_flag_bare_or_with_a_value(argv, expected):
    args = build_parser().parse_args(["simulate", *argv])
    assert config_from_args(args).tensorboard is expected


@pytest.mark.parametrize("raw, expected", [(True, True), (False, False), ("TRUE", True),
                                           ("no", False), (0, False), (1, True)])
def test_bool_values_from_toml_and_strings(raw, expected):
    assert RunConfig.from_mapping({"tensorboard": raw}).tensorboard is expected


@pytest.mark.parametrize("raw", ["maybe", 2, 0.5, ""])
def test_bad_bool_names_the_key(raw):
    with pytest.raises(ValueError, match="config 'tensorboard' expects true or false"):
        RunConfig.from_mapping({"tensorboard": raw})
