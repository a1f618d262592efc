"""Tests for config fields, layered resolution, error messages, help and YAML dumps."""

import dataclasses
import enum
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from xax.core.config import MISSING, field, register_config
from xax.core.config_io import config_to_dict, config_to_yaml, load_config, parse_cli
from xax.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class LogOptions:
    every: int = field(10, help="Log every this many steps")
    name: str | None = field(None, help="Name shown by the loggers")


@dataclass
class ModelConfig:
    hidden: int = field(64, help="Hidden width")


@dataclass
class DataConfig:
    batch_size: int = field(32, help="Samples per optimizer step")
    shuffle: bool = field(True, help="Shuffle the training data")


@dataclass
class OptimConfig:
    lr: float = field(1e-3, help="Peak learning rate")
    betas: list[float] = field([0.9, 0.999], help="Adam betas")
    log: LogOptions = field(LogOptions(), help="Logging options")


@dataclass
class Config(DataConfig, OptimConfig):
    """A task config composed from two mixin configs, as tasks do."""

    precision: Precision = field(Precision.FP32, help="Compute precision")
    max_steps: int | None = field(None, help="Stop after this many steps")


@dataclass
class RequiredConfig:
    data_dir: str = field(help="Where the data lives")
    model: ModelConfig = field(ModelConfig(), help="Model options")


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _error(config_class: type, argv: list[str], base: object = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config_class, base, argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# Resolution order.


def test_defaults() -> None:
    config = load_config(Config, None, [])
    assert config == Config()
    assert config.batch_size == 32
    assert config.betas == [0.9, 0.999]
    assert isinstance(config.log, LogOptions)
    assert config.log.every == 10
    assert config.precision is Precision.FP32


def test_mutable_defaults_are_not_shared() -> None:
    first, second = Config(), Config()
    first.betas.append(0.5)
    first.log.every = 99
    assert second.betas == [0.9, 0.999]
    assert second.log.every == 10
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}
    assert helps["batch_size"] == "Samples per optimizer step"


def test_instance_overrides_defaults() -> None:
    base = Config(batch_size=64, log=LogOptions(every=5))
    config = load_config(Config, base, [])
    assert config.batch_size == 64
    assert config.log.every == 5
    assert config.lr == 1e-3


def test_yaml_layering_order(tmp_path: Path) -> None:
    first = _write(tmp_path, "a.yaml", "batch_size: 8\nlr: 0.5\nlog:\n  every: 3\n")
    second = _write(tmp_path, "b.yaml", "lr: 0.25\nlog:\n  name: run\n")
    base = Config(batch_size=64, shuffle=False, max_steps=7)
    argv = ["--config", first, f"--config={second}", "log.every=4", "max_steps=null"]
    config = load_config(Config, base, argv)
    assert config.batch_size == 8  # the file over the instance
    assert config.shuffle is False  # the instance over the default
    assert config.lr == 0.25  # the second file over the first
    assert config.log == LogOptions(every=4, name="run")  # the command line over both files
    assert config.max_steps is None


def test_cli_after_files_regardless_of_position(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.yaml", "batch_size: 8\n")
    assert load_config(Config, None, ["batch_size=2", "--config", path]).batch_size == 2


def test_nested_and_typed_overrides() -> None:
    argv = [
        "log.every=7",
        "log.name=exp",
        "betas=[0.8,0.9]",
        "precision=BF16",
        "max_steps=100",
        "lr=3",
        "shuffle=false",
    ]
    config = load_config(Config, None, argv)
    assert config.log == LogOptions(every=7, name="exp")
    assert config.betas == [0.8, 0.9]
    assert config.precision is Precision.BF16
    assert config.max_steps == 100
    assert config.lr == 3.0
    assert isinstance(config.lr, float)
    assert config.shuffle is False


def test_later_override_wins() -> None:
    assert load_config(Config, None, ["batch_size=1", "batch_size=2"]).batch_size == 2


def test_required_value_set() -> None:
    config = load_config(RequiredConfig, None, ["data_dir=/data", "model.hidden=8"])
    assert config == RequiredConfig(data_dir="/data", model=ModelConfig(hidden=8))


# Errors: one line naming the key and the nearest valid one.


def test_unknown_key_suggests_nearest() -> None:
    message = _error(Config, ["batch_sze=3"])
    assert "'batch_sze'" in message
    assert "did you mean 'batch_size'" in message


def test_unknown_nested_key_suggests_nearest() -> None:
    message = _error(Config, ["log.evry=3"])
    assert "'log.evry'" in message
    assert "did you mean 'log.every'" in message
    message = _error(Config, ["lgo.every=3"])
    assert "'lgo.every'" in message
    assert "did you mean 'log.every'" in message


def test_wrong_type_names_key_and_type() -> None:
    message = _error(Config, ["batch_size=abc"])
    assert "'batch_size'" in message
    assert "expected int" in message
    assert "'abc'" in message
    message = _error(Config, ["precision=FP64"])
    assert "'precision'" in message
    assert "FP32" in message
    assert "BF16" in message
    message = _error(Config, ["betas=[0.9,x]"])
    assert "betas" in message
    assert "list[float]" in message


def test_group_given_a_scalar() -> None:
    message = _error(Config, ["log=3"])
    assert "'log'" in message
    assert "log.every" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("batch_size", "did you mean 'batch_size=VALUE'"),
        ("=3", "key before '=' is empty"),
        ("a..b=1", "'a..b'"),
        ("--batch_size=3", "did you mean 'batch_size'"),
    ],
)
def test_malformed_override(override: str, expected: str) -> None:
    message = _error(Config, [override])
    assert f"malformed override '{override}'" in message
    assert expected in message


def test_malformed_override_suggests_a_valid_key() -> None:
    message = _error(Config, ["log..every=1"])
    assert "did you mean 'log.every'" in message


def test_missing_required_value() -> None:
    message = _error(RequiredConfig, [])
    assert "'data_dir'" in message
    assert "data_dir=VALUE" in message


def test_unknown_key_in_yaml_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "log:\n  evry: 3\n")
    message = _error(Config, ["--config", path])
    assert path in message
    assert "'log.evry'" in message
    assert "did you mean 'log.every'" in message


def test_dotted_key_in_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "dotted.yaml", "log.every: 3\n")
    message = _error(Config, ["--config", path])
    assert path in message
    assert "'log.every'" in message
    assert "nest it" in message


def test_wrong_type_in_yaml_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "batch_size: many\n")
    message = _error(Config, ["--config", path])
    assert path in message
    assert "'batch_size'" in message


def test_missing_yaml_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    message = _error(Config, ["--config", path])
    assert f"'{path}'" in message


@pytest.mark.parametrize("text", ["batch_size: [1\n", "- 1\n- 2\n"])
def test_unparsable_yaml_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "broken.yaml", text)
    message = _error(Config, [f"--config={path}"])
    assert f"'{path}'" in message


@pytest.mark.parametrize("argv", [["--config"], ["--config="], ["--verbose"]])
def test_bad_flags(argv: list[str]) -> None:
    message = _error(Config, argv)
    assert "--config" in message


def test_bad_base_instance() -> None:
    message = _error(Config, [], base=Config(batch_size="abc"))  # ty: ignore[invalid-argument-type]
    assert "'batch_size'" in message
    assert "passed to launch" in message
    with pytest.raises(ConfigError, match="pass a Config"):
        load_config(Config, RequiredConfig(data_dir="x"), [])


# Command line entry point.


def test_parse_cli_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_cli(Config, None, ["batch_sze=3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: unknown config key 'batch_sze'")


def test_parse_cli_returns_config() -> None:
    assert parse_cli(Config, Config(lr=0.1), ["batch_size=4"]) == Config(lr=0.1, batch_size=4)


def test_cli_subprocess_one_line_error() -> None:
    program = textwrap.dedent(
        """
        import sys
        from dataclasses import dataclass
        from xax.core.config import field
        from xax.core.config_io import parse_cli

        @dataclass
        class Small:
            batch_size: int = field(32, help="Samples per step")

        print(parse_cli(Small, None, sys.argv[1:]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", program, "batch_sise=3"], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "'batch_sise'" in lines[0]
    assert "'batch_size'" in lines[0]
    assert result.stdout == ""


# Pytree registration.


def test_register_config_is_static_and_idempotent() -> None:
    config = load_config(Config, None, ["batch_size=5"])  # registers Config and LogOptions
    assert register_config(Config) is Config
    assert register_config(Config) is Config
    leaves, treedef = jax.tree_util.tree_flatten(config)
    assert leaves == []
    assert jax.tree_util.tree_unflatten(treedef, []) == config
    assert jax.tree_util.tree_leaves(config.log) == []

    @jax.jit
    def scale(cfg: Config, x: jax.Array) -> jax.Array:
        return x * cfg.batch_size

    assert float(scale(config, jnp.ones(()))) == 5.0


def test_register_config_as_decorator_and_rejects_non_dataclass() -> None:
    @register_config
    @dataclass
    class Decorated:
        value: int = 1

    assert register_config(Decorated) is Decorated
    assert jax.tree_util.tree_leaves(Decorated()) == []
    with pytest.raises(TypeError, match="dataclass"):
        register_config(int)


# Dumping.


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = Config(batch_size=3, betas=[0.5, 0.6], log=LogOptions(every=2, name="x"), precision=Precision.BF16)
    as_dict = config_to_dict(config)
    assert as_dict["precision"] == "BF16"
    assert as_dict["log"] == {"every": 2, "name": "x"}
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(Config, None, ["--config", str(path)]) == config


def test_missing_marker_is_omegaconf_missing() -> None:
    assert MISSING == "???"
    assert config_to_dict(RequiredConfig(data_dir="d"))["model"] == {"hidden": 64}
