"""Every config group is checked before anything is created: one line, exit 2, no run directory."""

from pathlib import Path

import pytest

from tests.task.toy import Regression, RegressionConfig

BAD = [
    ("max_grad_norm=-1", "max_grad_norm=-1.0 must be > 0"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps=0 must be >= 1"),
    ("checkpoint.every_n_steps=-5", "checkpoint.every_n_steps=-5 must be >= 1"),
    ("checkpoint.every_n_seconds=0", "checkpoint.every_n_seconds=0.0 must be > 0"),
    ("log.every_n_steps=0", "log.every_n_steps=0 must be >= 1"),
    ("log.every_n_seconds=-1", "log.every_n_seconds=-1.0 must be > 0"),
    ("log.heavy_every_n_steps=0", "log.heavy_every_n_steps=0 must be >= 1"),
    ("max_steps=", "config key 'max_steps' has an empty value on the command line"),
    ("valid_batch_size=-1", "valid_batch_size=-1 must be >= 1"),
    ("data.prefetch=-1", "data.prefetch=-1 must be >= 1"),
    ("data.prefetch=0", "data.prefetch=0 must be >= 1"),
    ("batch_size=0", "batch_size=0 must be >= 1"),
    ("log.wandb_mode=cloud", "log.wandb_mode='cloud' is not one of ['offline', 'online', 'disabled']"),
    ("launcher.num_cpu_devices=0", "launcher.num_cpu_devices=0 must be >= 1"),
    ("nan.max_rewinds=-1", "nan.max_rewinds=-1 must be >= 0"),
    ("process.shutdown_timeout_s=0", "process.shutdown_timeout_s=0.0 must be > 0"),
    ("watchdog.step_s=0", "watchdog.step_s=0.0 must be > 0"),
    ("watchdog.startup_s=-1", "watchdog.startup_s=-1.0 must be > 0"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_a_bad_value_is_one_line_before_anything_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    runs = tmp_path / "runs"
    argv = [f"artifacts.runs_root={runs}", "log.stdout=false", "max_steps=3", override]
    if override.startswith("launcher.num_cpu_devices"):
        argv.append("launcher.kind=multi_cpu")
    with pytest.raises(SystemExit) as exit_info:
        Regression.launch(RegressionConfig(batch_size=32), argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert not runs.exists()  # no run directory left behind


def test_a_run_directory_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    for argv in ([f"artifacts.run_dir={blocker}"], [f"artifacts.run_dir={blocker / 'run'}"]):
        with pytest.raises(SystemExit) as exit_info:
            Regression.launch(RegressionConfig(batch_size=32), argv=[*argv, "log.stdout=false", "max_steps=2"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: artifacts.run_dir=") and "file; choose a folder" in err, err
        assert len(err.splitlines()) == 1
    assert blocker.read_text() == "not a folder"
