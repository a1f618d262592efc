"""Tests for the W&B logger: an offline run, in a subprocess so that a hang fails instead of blocking."""

import glob
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import xax.task.loggers.wandb as wandb_logger
from tests.task.toy import Regression, RegressionConfig
from xax.core.errors import ConfigError
from xax.task.loggers.wandb import WandbLogger

WANDB_INSTALLED = importlib.util.find_spec("wandb") is not None
REPO_ROOT = Path(wandb_logger.__file__).resolve().parents[3]

# The .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) chunks.
_BLOCK = 32768
_FULL, _LAST = 1, 4

_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np

    from xax.core.errors import ConfigError
    from xax.core.metric import LogAudio, LogImage, LogVideo
    from xax.task.loggers.base import LogRecord
    from xax.task.loggers.wandb import WandbLogger

    root = sys.argv[1]
    try:
        WandbLogger(root + "/online", project="xax-test", mode="online")
    except ConfigError as e:
        print("online refused:", e)

    logger = WandbLogger(
        root + "/run", project="xax-test", name="offline", config={"lr": 0.1}, tags=["a", "b"], group="g", notes="n"
    )
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    logger.write(
        LogRecord(
            step=3,
            num_samples=96,
            elapsed_time_s=1.0,
            phase="train",
            scalars={"loss": 0.5},
            images={"grid": LogImage(pixels)},
            texts={"sample": "a<b"},
            histograms={"weights": np.arange(5, dtype=np.float32)},
            audio={"speech": LogAudio(np.zeros((800, 1), np.float32), 8000)},
            videos={"rollout": LogVideo(np.zeros((3, 4, 6, 3), np.uint8), fps=5.0)},
        )
    )
    logger.write(LogRecord(step=3, num_samples=96, elapsed_time_s=1.5, phase="valid", scalars={"loss": 0.75}))
    logger.close()
    logger.close()
    print("finished")
    """
)


def _records(path: Path) -> Iterator[Any]:
    """Yields each record (a ``wandb_internal_pb2.Record``) of a .wandb file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # Block trailer padding.
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            yield wandb_internal_pb2.Record.FromString(pending)  # ty: ignore[missing-attribute]
            pending = b""


def _history(path: Path) -> Iterator[dict[str, str]]:
    """Yields each history row of a .wandb file as {key: JSON value}."""
    for record in _records(path):
        if record.WhichOneof("record_type") == "history":
            yield {"/".join(item.nested_key): item.value_json for item in record.history.item}


def _run_record(path: Path) -> Any:
    """The run's own record (id, name, tags, group, notes) in a .wandb file."""
    return next(record.run for record in _records(path) if record.WhichOneof("record_type") == "run")


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials, no user config, and every W&B file under tmp_path."""
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))


@pytest.mark.skipif(not WANDB_INSTALLED, reason="wandb is not installed")
@pytest.mark.usefixtures("wandb_env")
def test_offline_run_writes_its_files(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "online refused: mode=online needs W&B credentials: set WANDB_API_KEY" in result.stdout
    assert result.stdout.rstrip().endswith("finished")
    assert not (tmp_path / "online").exists()
    # W&B prints nothing of its own: no login prompt, no warning (it warned of `fps` at each video).
    assert "wandb" not in result.stderr.lower(), result.stderr

    (run_dir,) = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*"))
    (run_file,) = Path(run_dir).glob("run-*.wandb")
    run = _run_record(run_file)
    assert json.loads((tmp_path / "run" / "wandb_run.json").read_text()) == {"id": run.run_id, "name": "offline"}
    assert (run.display_name, list(run.tags), run.run_group, run.notes) == ("offline", ["a", "b"], "g", "n")
    rows = list(_history(run_file))
    train = next(row for row in rows if "train/loss" in row)
    valid = next(row for row in rows if "valid/loss" in row)
    assert (train["step"], train["train/loss"], train["train/num_samples"]) == ("3", "0.5", "96")
    assert (valid["step"], valid["valid/loss"]) == ("3", "0.75")
    assert train["train/weights/_type"] == '"histogram"'
    assert train["train/grid/_type"] == '"image-file"'
    assert (train["train/grid/width"], train["train/grid/height"]) == ("6", "4")
    assert train["train/speech/_type"] == '"audio-file"'
    assert train["train/rollout/_type"] == '"video-file"'
    (wav,) = Path(run_dir).glob("files/media/audio/train/speech_*.wav")
    assert wav.read_bytes()[:4] == b"RIFF"
    (gif,) = Path(run_dir).glob("files/media/videos/train/rollout_*.gif")
    assert gif.read_bytes()[:6] == b"GIF89a"
    (html,) = Path(run_dir).glob("files/media/html/train/sample_*.html")
    assert "<pre>a&lt;b</pre>" in html.read_text()


def test_missing_wandb_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes `import wandb` raise ImportError.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'xax\[wandb\]'"):
        WandbLogger(tmp_path, project="xax-test")


# Through the task: an online run without credentials is refused before anything exists; an offline
# run, checkpointed, then resumed (resume=auto), continues the same W&B run.
_RUNS = textwrap.dedent(
    """
    import sys

    from tests.task.toy import Regression, RegressionConfig

    root = sys.argv[1]
    common = ["log.wandb=true", "log.stdout=false", "log.level=warning", "log.tensorboard=false", "log.every_n_steps=1"]
    try:
        Regression.launch(RegressionConfig(batch_size=32), argv=[f"artifacts.runs_root={root}/online", *common,
                          "log.wandb_mode=online", "max_steps=2"])
    except SystemExit as e:
        print("online exit", e.code)
    run = [f"artifacts.run_dir={root}/run", *common, "checkpoint.every_n_steps=2", "log.wandb_tags=[x,y]"]
    Regression.launch(RegressionConfig(batch_size=32), argv=[*run, "max_steps=2"])
    Regression.launch(RegressionConfig(batch_size=32), argv=[*run, "max_steps=4", "resume=auto"])
    print("finished")
    """
)


@pytest.mark.skipif(not WANDB_INSTALLED, reason="wandb is not installed")
@pytest.mark.usefixtures("wandb_env")
def test_a_resumed_task_continues_its_wandb_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _RUNS, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines() == ["online exit 2", "finished"], result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: log.wandb_mode=online needs W&B credentials: set WANDB_API_KEY or run `wandb login`, "
        "or set log.wandb_mode=offline and upload the run later with `wandb sync`"
    ]
    assert not (tmp_path / "online").exists()

    stored = json.loads((tmp_path / "run" / "wandb_run.json").read_text())
    assert stored["name"].startswith(f"run-{socket.gethostname()}-")
    first, second = sorted(Path(tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert first.name.endswith(stored["id"]) and second.name.endswith(stored["id"])
    runs = [_run_record(next(folder.glob("run-*.wandb"))) for folder in (first, second)]
    assert [(run.run_id, run.display_name, list(run.tags)) for run in runs] == [
        (stored["id"], stored["name"], ["x", "y"])
    ] * 2
    steps = [
        [int(row["step"]) for row in _history(next(folder.glob("run-*.wandb"))) if "train/loss" in row]
        for folder in (first, second)
    ]
    assert steps == [[1, 2], [3, 4]]


def test_unknown_mode_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="W&B mode must be one of online, offline, disabled; got 'cloud'"):
        WandbLogger(tmp_path, project="xax-test", mode="cloud")


_UNREACHABLE = textwrap.dedent(
    """
    import logging
    import sys

    from xax.task.loggers.base import LogRecord
    from xax.task.loggers.wandb import WandbLogger

    logging.basicConfig(format="%(levelname)s %(message)s")
    logger = WandbLogger(sys.argv[1], project="xax-test", mode="online", init_timeout_s=2.0)
    logger.write(LogRecord(step=1, num_samples=8, elapsed_time_s=0.1, phase="train", scalars={"loss": 2.5}))
    logger.close()
    print("finished")
    """
)


@pytest.mark.skipif(not WANDB_INSTALLED, reason="wandb is not installed")
@pytest.mark.usefixtures("wandb_env")
def test_an_unreachable_server_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a local port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    result = subprocess.run(
        [sys.executable, "-c", _UNREACHABLE, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "finished"
    # One line of warning and nothing from W&B itself.
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("WARNING W&B could not start the online run (") and "connection refused" in warning
    assert f"logging offline into {tmp_path / 'wandb'} instead" in warning
    stored = json.loads((tmp_path / "wandb_run.json").read_text())
    (folder,) = (tmp_path / "wandb").glob(f"offline-run-*-{stored['id']}")
    rows = list(_history(next(folder.glob("run-*.wandb"))))
    assert [(row["step"], row["train/loss"]) for row in rows] == [("1", "2.5")]


def test_a_task_asking_for_wandb_without_it_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    argv = [f"artifacts.runs_root={tmp_path / 'runs'}", "log.wandb=true", "log.stdout=false", "max_steps=2"]
    with pytest.raises(SystemExit) as exit_info:
        Regression.launch(RegressionConfig(batch_size=32), argv=argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: W&B logging needs the `wandb` package") and "pip install 'xax[wandb]'" in line
    assert not (tmp_path / "runs").exists()
