"""The MNIST example: a short real run, and (marked slow) the full default run to 99% accuracy."""

from pathlib import Path

import pytest

from examples.mnist import Config, MnistClassification
from tests.task.loggers.test_tensorboard import read_events, tag_values
from tests.task.toy import read_jsonl


def launch(run_dir: Path, config: Config, *overrides: str) -> None:
    MnistClassification.launch(config, argv=[f"artifacts.run_dir={run_dir}", "log.stdout=false", *overrides])


def test_short_run_learns_and_logs_a_prediction_grid(tmp_path: Path) -> None:
    launch(
        tmp_path,
        Config(batch_size=64, max_steps=60, valid_every_n_steps=60, channels=8, hidden=32),
        "log.every_n_steps=20",
        "log.every_n_seconds=null",  # records by steps only, however slow the machine
        "log.heavy_every_n_seconds=null",
        "valid_batch_size=1000",
    )
    records = read_jsonl(tmp_path / "log.jsonl")
    train = [r["scalars"] for r in records if r["phase"] == "train"]
    valid = [r["scalars"] for r in records if r["phase"] == "valid" and "accuracy" in r["scalars"]]
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    assert valid[-1]["accuracy"] > 0.6
    images = tag_values(read_events(tmp_path / "tensorboard" / "valid"))["predictions"]
    step, value = images[-1]
    assert step == 60
    assert value.image.height > 28 and value.image.width >= 8 * 28  # a grid of 8 tiles per row


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 6 minutes on 2 idle cores, past 13 on busy ones: above the 600 s default
def test_default_config_reaches_99_percent(tmp_path: Path) -> None:
    # The configuration `python -m examples.mnist` runs.
    launch(tmp_path, Config(batch_size=128, max_steps=1875, valid_every_n_steps=625))
    records = read_jsonl(tmp_path / "log.jsonl")
    valid = [r["scalars"] for r in records if r["phase"] == "valid" and "accuracy" in r["scalars"]]
    assert len(valid) == 3
    print(f"MNIST test accuracy after {records[-1]['step']} steps: {valid[-1]['accuracy']:.4f}")
    assert valid[-1]["accuracy"] >= 0.99
