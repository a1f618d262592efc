"""Launchers, exit codes and clean shutdown, with real subprocesses where it matters."""

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.task.toy import Regression, RegressionConfig, start_toy

ROOT = Path(__file__).resolve().parents[3]


def start(tmp_path: Path, *overrides: str) -> subprocess.Popen[str]:
    return start_toy(tmp_path, *overrides)


def test_multi_cpu_launcher_simulates_devices(tmp_path: Path) -> None:
    proc = start(tmp_path, "launcher.kind=multi_cpu", "launcher.num_cpu_devices=2", "max_steps=5")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "devices=2 steps=5" in out


def test_single_device_launcher_uses_one_device(tmp_path: Path) -> None:
    meshes = []

    class Recorded(Regression):
        def on_run_start(self) -> None:
            super().on_run_start()
            meshes.append(self.get_mesh())

    Recorded.launch(
        RegressionConfig(batch_size=32, max_steps=2),
        argv=["launcher.kind=single_device", f"artifacts.run_dir={tmp_path}", "log.stdout=false"],
    )
    assert meshes[0].devices.size == 1


def test_unknown_launcher_is_a_one_line_error(tmp_path: Path) -> None:
    proc = start(tmp_path, "launcher.kind=tpu_pod", "max_steps=1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0
    assert "launcher.kind='tpu_pod'" in err and "multi_cpu" in err


def test_unknown_key_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = start(tmp_path, "max_stepz=3")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err
    assert "max_stepz" in err and "max_steps" in err


def test_ctrl_c_stops_cleanly_with_exit_130(tmp_path: Path) -> None:
    proc = start(tmp_path, "log.every_n_steps=1", "valid_every_n_steps=null")
    log = tmp_path / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err
    assert "Traceback" not in err


def test_failure_in_a_background_worker_exits_nonzero(tmp_path: Path) -> None:
    proc = start(tmp_path, "fail_after_rows=100", "max_steps=1000")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "the data source broke after 100 rows" in err


@pytest.mark.parametrize("kind", ["single_device", "multi_device"])
def test_launcher_kinds_train(tmp_path: Path, kind: str) -> None:
    state = Regression.launch(
        RegressionConfig(batch_size=32, max_steps=3),
        argv=[f"launcher.kind={kind}", f"artifacts.run_dir={tmp_path}", "log.stdout=false"],
    )
    assert state.num_steps == 3
