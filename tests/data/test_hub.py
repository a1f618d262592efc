"""A Hugging Face hub dataset that cannot be had without network fails at once, in one line, naming
the dataset and the fix; tested offline (HF_HUB_OFFLINE) and against a closed port on localhost."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import datasets.config
import pytest

import xax
import xax.data
from tests.task.toy import ROOT, Regression, RegressionConfig
from xax.core.errors import HubError

# Loads a hub dataset by name and prints the error's type, the seconds the call took and its message.
LOAD = """
import time
import xax.data
start = time.perf_counter()
try:
    xax.data.load_hub_dataset("ylecun/mnist", split="train")
except Exception as error:
    print(type(error).__name__, round(time.perf_counter() - start, 2), error, sep="|")
"""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_offline(tmp_path: Path, **env: str) -> tuple[str, float, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    result = subprocess.run(
        [sys.executable, "-c", LOAD],
        env={**base, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.count("\n") == 1, result.stdout + result.stderr
    kind, seconds, message = result.stdout.strip().split("|")
    return kind, float(seconds), message


def test_offline_mode_names_the_dataset_and_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    start = time.perf_counter()
    with pytest.raises(HubError) as error:
        xax.data.load_hub_dataset("ylecun/mnist", split="train", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    assert str(error.value) == (
        f"dataset 'ylecun/mnist' is not in the Hugging Face cache ({tmp_path}) and offline "
        "mode is on (HF_HUB_OFFLINE); load it once with network access, or load local files: "
        "datasets.load_dataset('parquet' or 'csv', data_files=...)"
    )


def test_an_unreachable_hub_fails_at_once(tmp_path: Path) -> None:
    # Without the probe, datasets retries for about 25 s before its traceback.
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    kind, seconds, message = _load_offline(tmp_path, HF_ENDPOINT=endpoint)
    assert kind == "HubError"
    assert seconds < 5
    assert message.startswith(f"dataset 'ylecun/mnist': {endpoint} cannot be reached (ConnectError")
    assert "HF_HUB_OFFLINE=1" in message
    assert "data_files=" in message


class HubRegression(Regression):
    """get_dataset reads a hub dataset with datasets.load_dataset itself."""

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        return datasets.load_dataset("ylecun/mnist", split="train" if phase == "train" else "test")


def test_a_task_whose_dataset_needs_the_network_exits_2_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    argv = [f"artifacts.run_dir={tmp_path / 'run'}", "log.stdout=false", "log.tensorboard=false", "max_steps=2"]
    with pytest.raises(SystemExit) as exit_info:
        HubRegression.launch(RegressionConfig(batch_size=4), argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: get_dataset('train'): Couldn't reach 'ylecun/mnist' on the Hub")
    assert "HF_HUB_OFFLINE=1" in lines[0]
    assert "xax.data.load_hub_dataset" in lines[0]
    assert "Traceback" not in err
