"""Each config group checks itself, all before the run writes anything.

A bad value in any group ends the launch with one line and exit code 2, and leaves no run
directory: the checks run in ``validate_config`` (the device-aware one against the mesh built from
the launcher's devices) before ``on_run_start`` makes the folder, the logs or any thread.
"""

from pathlib import Path

import pytest

from tests.task.toy import Regression, RegressionConfig

# One bad value per group (tests/task/mixins/test_config_checks.py covers more of some groups).
BAD = [
    ("launcher.kind=moon", "launcher.kind='moon' is not one of"),
    ("launcher.num_devices=0", "launcher.num_devices=0 must be >= 1"),
    ("artifacts.runs_root=''", "artifacts.runs_root is empty"),
    ("parallel.plan=zigzag", "parallel.plan"),
    ("grad_accum_steps=0", "grad_accum_steps=0 must be at least 1"),
    ("ema.decay=1.5", "ema.decay=1.5 must be in [0, 1)"),
    ("nan.policy=panic", "nan.policy='panic' is not one of"),
    ("valid_every_n_seconds=0", "valid_every_n_seconds=0.0 must be > 0"),
    ("cpu_stats.interval_s=0", "cpu_stats.interval_s must be a positive number"),
    ("gpu_stats.interval_s=-1", "gpu_stats.interval_s must be a positive number"),
    ("perf.peak_tflops=-1", "perf.peak_tflops=-1.0 must be positive"),
    ("perf.profile_steps=[5,3]", "perf.profile_steps=[5, 3] must be [first, last]"),
    ("log.heavy_every_n_seconds=0", "log.heavy_every_n_seconds=0.0 must be > 0"),
    ("process.shutdown_timeout_s=-1", "process.shutdown_timeout_s=-1.0 must be > 0"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer=0 must be >= 1"),
    ("checkpoint.keep_best=-1", "checkpoint.keep_best=-1 must be >= 0"),
    # Device-aware: 4 simulated devices cannot split a batch of 6.
    ("batch_size=6", "batch_size=6 is not divisible by grad_accum_steps x data x fsdp = 1 x 4 x 1"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_each_group_fails_before_the_run_directory_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    runs = tmp_path / "runs"
    argv = [f"artifacts.runs_root={runs}", "log.stdout=false", "max_steps=3", "launcher.kind=multi_device", override]
    if override.startswith("artifacts.runs_root"):
        argv.pop(0)  # the override empties it
    with pytest.raises(SystemExit) as exit_info:
        Regression.launch(RegressionConfig(batch_size=32), argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert not runs.exists()
