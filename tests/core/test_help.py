"""Tests for ``--help`` and ``--help-all``: effective values, the task's options first, framework
groups folded, wrapping, choices and the program name; and for choices being checked."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import xax
from examples.mnist import Config as MnistConfig
from tests.core.test_config import Config, RequiredConfig
from xax.core.config_io import load_config, parse_cli
from xax.core.errors import ConfigError
from xax.core.help import format_help
from xax.task.base import BaseConfig, BaseTask

REPO_ROOT = Path(__file__).resolve().parents[2]
MNIST_BASE = MnistConfig(batch_size=128, max_steps=1875, valid_every_n_steps=625)


def help_of(capsys: pytest.CaptureFixture[str], config_class: type, base: object, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        parse_cli(config_class, base, list(argv))
    assert info.value.code == 0
    return capsys.readouterr().out


def option_lines(text: str) -> dict[str, str]:
    """Each option's first line, by key."""
    return {line.split("=")[0].strip(): line for line in text.splitlines() if line.startswith("  ") and "=" in line}


def test_help_shows_the_values_the_command_would_use(capsys: pytest.CaptureFixture[str]) -> None:
    lines = option_lines(help_of(capsys, Config, Config(lr=0.1), "batch_size=4", "--help"))
    expected = {
        "batch_size": "batch_size=4 ",
        "lr": "lr=0.1 ",
        "betas": "betas=[0.9, 0.999] ",
        "log.every": "log.every=10 ",
        "log.name": "log.name=null ",
        "precision": "precision=FP32 ",
        "max_steps": "max_steps=null ",
    }
    for key, start in expected.items():
        assert lines[key].lstrip().startswith(start), lines[key]
    assert lines["log.name"].endswith("Name shown by the loggers [str | None]")
    assert lines["precision"].endswith("Compute precision [Precision (one of FP32, BF16)]")


def test_help_with_a_mistake_shows_the_launch_values_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys, Config, Config(lr=0.1), "batch_size=oops", "--help")
    assert option_lines(text)["lr"].lstrip().startswith("lr=0.1 ")
    assert option_lines(text)["batch_size"].lstrip().startswith("batch_size=32 ")
    assert "leave out the command line, which has a mistake: invalid value for config key 'batch_size'" in text


def test_help_marks_required_and_nested_defaults() -> None:
    lines = option_lines(format_help(RequiredConfig, width=100))
    assert lines["data_dir"].lstrip().startswith("data_dir=<required> ")
    assert lines["model.hidden"].lstrip().startswith("model.hidden=64 ")


def test_task_options_first_and_framework_groups_folded(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys, MnistConfig, MNIST_BASE, "--help")
    keys = list(option_lines(text))
    # The example's own options, in their order, then the framework's top-level ones.
    assert keys[:8] == [
        "hidden",
        "channels",
        "dropout",
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "data_source",
        "num_media_images",
    ]
    assert option_lines(text)["max_steps"].lstrip().startswith("max_steps=1875 ")
    assert not any("." in key for key in keys)  # no group is expanded
    assert "  log.*" in text and "--help-all lists their options" in text
    assert len(text.splitlines()) < 70


def test_help_all_lists_every_group_with_choices(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys, MnistConfig, MNIST_BASE, "log.level=debug", "--help-all")
    lines = option_lines(text)
    assert lines["log.level"].lstrip().startswith("log.level=debug ")
    assert "[str: one of debug, info, warning, error]" in text.replace("\n", " ").replace("  ", " ")
    assert {"checkpoint.keep_last", "compile.debug_nans", "launcher.kind", "nan.policy"} <= set(lines)


def test_help_wraps_to_the_width() -> None:
    text = format_help(MnistConfig, MNIST_BASE, prog="train", show_all=True, width=64)
    long = [line for line in text.splitlines() if len(line) > 64]
    # Only a key=value longer than the width itself may stand past it (on a line of its own).
    assert all(line.startswith("  ") and " " not in line.strip() for line in long), long


def test_choices_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^log.level=loud is not one of: debug, info, warning, error$"):
        load_config(xax.Config, None, ["log.level=loud"])


@dataclass
class Choosy(BaseConfig):
    mode: str = xax.field("fast", help="How", choices=("fast", "slow"))


class Bare(BaseTask[Choosy]):
    pass


def test_choices_are_checked_when_a_task_is_built_directly() -> None:
    with pytest.raises(ConfigError, match=r"^mode=medium is not one of: fast, slow$"):
        Bare(Choosy(mode="medium")).validate_config()


def test_mnist_help_in_a_terminal_of_80_columns() -> None:
    env = {**os.environ, "COLUMNS": "80"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.mnist", "--help"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: python -m examples.mnist [--config FILE.yaml]")
    assert max(len(line) for line in lines) <= 80
    assert option_lines(result.stdout)["max_steps"].lstrip().startswith("max_steps=1875 ")


def test_groups_a_task_redefines_are_listed_with_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """mnist_diffusion has groups of its own (unet, dit) and its own defaults for ema, precision, optim
    and log: --help folds them first among the groups, --help-all lists their options with the task's
    values."""
    from examples.mnist_diffusion import Config as DiffusionConfig

    folded = help_of(capsys, DiffusionConfig, DiffusionConfig(), "--help")
    groups = [line.split()[0] for line in folded.split("Option groups")[1].splitlines()[1:] if line[2] != " "]
    assert set(groups[:6]) == {"log.*", "precision.*", "ema.*", "optim.*", "unet.*", "dit.*"}, groups
    assert groups[6:9] == ["nan.*", "checkpoint.*", "data.*"], groups
    lines = option_lines(help_of(capsys, DiffusionConfig, DiffusionConfig(), "--help-all"))
    assert lines["ema.decay"].lstrip().startswith("ema.decay=0.999 ")
    assert lines["optim.lr"].lstrip().startswith("optim.lr=0.0005 ")
    assert {"precision.compute_dtype", "log.heavy_every_n_steps", "unet.base_channels", "nan.policy"} <= set(lines)
