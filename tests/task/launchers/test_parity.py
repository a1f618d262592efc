"""The same task gives the same result on any device count."""

from pathlib import Path

import jax
import numpy as np

from tests.task.toy import Digits, DigitsConfig, read_jsonl


def train_on(num_devices: int, run_dir: Path) -> tuple[list[float], list[float]]:
    Digits.launch(
        DigitsConfig(batch_size=32, max_steps=20, valid_every_n_steps=10),
        argv=[
            "launcher.kind=multi_device",
            f"launcher.num_devices={num_devices}",
            f"artifacts.run_dir={run_dir}",
            "log.every_n_steps=1",
            "log.every_n_seconds=null",
            "log.stdout=false",
            "log.tensorboard=false",
        ],
    )
    records = read_jsonl(run_dir / "log.jsonl")
    train = [r["scalars"]["loss"] for r in records if r["phase"] == "train"]
    valid = [r["scalars"]["loss"] for r in records if r["phase"] == "valid"]
    return train, valid


def test_one_and_four_devices_give_the_same_losses(tmp_path: Path) -> None:
    assert jax.device_count() >= 4
    train_1, valid_1 = train_on(1, tmp_path / "one")
    train_4, valid_4 = train_on(4, tmp_path / "four")
    assert len(train_1) == 20
    assert train_1[-1] < 0.7 * train_1[0]  # it learns, so the comparison is not between constants
    np.testing.assert_allclose(train_4, train_1, rtol=1e-5)
    np.testing.assert_allclose(valid_4, valid_1, rtol=1e-5)


def test_frequent_validation_and_media_on_simulated_devices(tmp_path: Path) -> None:
    # Training, validation and media programs interleaving on 4 CPU devices once deadlocked in
    # their all-reduces; each program now finishes before the next one starts there.
    Digits.launch(
        DigitsConfig(batch_size=32, max_steps=30, valid_every_n_steps=2),
        argv=[
            "launcher.kind=multi_device",
            f"artifacts.run_dir={tmp_path}",
            "log.every_n_steps=1",
            "log.heavy_every_n_steps=1",
            "log.stdout=false",
        ],
    )
    valid = [r for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "valid"]
    assert [r["step"] for r in valid] == list(range(2, 31, 2))
