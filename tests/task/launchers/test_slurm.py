"""The slurm launcher: the sbatch script it writes, and its submission through a stand-in sbatch."""

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.task.toy import ROOT, Regression, RegressionConfig
from xax.core.config_io import load_config
from xax.core.errors import LaunchError
from xax.task.launchers.slurm import CONFIG_NAME, SCRIPT_NAME, SlurmLauncher, SlurmOptions

PROGRAM = ["/opt/venv/bin/python", "-m", "experiments.train"]


def config_for(tmp_path: Path, **changes: object) -> RegressionConfig:
    config = RegressionConfig(batch_size=64, max_steps=100)
    config.artifacts.runs_root = str(tmp_path / "runs")
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def fake_sbatch(folder: Path, *, exit_code: int = 0) -> Path:
    """An executable named sbatch that records its arguments and answers like ``sbatch --parsable``."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "calls.txt"
    script = folder / "sbatch"
    answer = 'echo "sbatch: error: invalid partition specified: gpuz" >&2' if exit_code else 'echo "8123;cluster1"'
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {shlex.quote(str(record))}\n{answer}\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return record


def test_script_runs_one_multi_host_task_per_node(tmp_path: Path) -> None:
    options = SlurmOptions(
        nodes=4,
        gpus_per_node=8,
        partition="h100",
        time="12:00:00",
        account="lab",
        sbatch_options=["--mem=0", "--exclusive"],
        setup=["source /opt/venv/bin/activate"],
        dry_run=True,
    )
    config = config_for(tmp_path)
    config.launcher.kind, config.launcher.slurm = "slurm", options
    SlurmLauncher(options, program=PROGRAM).launch(Regression, config)
    run_dir = tmp_path / "runs" / "regression" / "run_000"
    lines = (run_dir / SCRIPT_NAME).read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=regression",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=h100",
        "#SBATCH --time=12:00:00",
        "#SBATCH --account=lab",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        "#SBATCH --mem=0",
        "#SBATCH --exclusive",
    ]
    assert f"cd {shlex.quote(str(Path.cwd()))}" in lines
    assert lines.index("source /opt/venv/bin/activate") < len(lines) - 1
    srun = shlex.split(lines[-1])
    config_path = run_dir / CONFIG_NAME
    assert srun == [
        "srun",
        "--nodes=4",
        "--ntasks-per-node=1",
        *PROGRAM,
        "--config",
        str(config_path),
        "launcher.kind=multi_host",
        f"artifacts.run_dir={run_dir}",
    ]
    # The job resolves the same config, apart from the launcher it runs under and its folder.
    resolved = load_config(RegressionConfig, None, srun[len(PROGRAM) + 3 :])
    config.launcher.kind, config.artifacts.run_dir = "multi_host", str(run_dir)
    assert resolved == config


def test_cpu_nodes_and_a_chosen_folder(tmp_path: Path) -> None:
    options = SlurmOptions(nodes=2, gpus_per_node=0, script_dir=str(tmp_path / "jobs"), dry_run=True)
    run_dir = tmp_path / "fixed_run"
    SlurmLauncher(options, program=PROGRAM).launch(Regression, config_for(tmp_path))
    SlurmLauncher(options, program=PROGRAM).launch(Regression, config_for(tmp_path))
    text = (tmp_path / "jobs" / SCRIPT_NAME).read_text()
    assert "--gpus-per-node" not in text and "--partition" not in text
    # Each launch takes the next numbered run directory, which the job writes into.
    assert f"artifacts.run_dir={tmp_path / 'runs' / 'regression' / 'run_001'}" in text
    config = config_for(tmp_path)
    config.artifacts.run_dir = str(run_dir)
    SlurmLauncher(options, program=PROGRAM).launch(Regression, config)
    assert f"artifacts.run_dir={run_dir}" in (tmp_path / "jobs" / SCRIPT_NAME).read_text()


def test_submits_with_sbatch_from_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record = fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    SlurmLauncher(SlurmOptions(nodes=2), program=PROGRAM).launch(Regression, config_for(tmp_path))
    script = tmp_path / "runs" / "regression" / "run_000" / SCRIPT_NAME
    assert record.read_text().splitlines() == ["--parsable", str(script)]
    assert f"submitted SLURM job 8123: {script}" in capsys.readouterr().out


def test_missing_or_failing_sbatch_is_a_launch_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LaunchError, match=r"sbatch is not on PATH.*launcher\.slurm\.dry_run=true"):
        SlurmLauncher(SlurmOptions(), program=PROGRAM).launch(Regression, config_for(tmp_path))
    fake_sbatch(tmp_path / "bin", exit_code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(LaunchError, match=r"sbatch rejected .*invalid partition specified: gpuz"):
        SlurmLauncher(SlurmOptions(partition="gpuz"), program=PROGRAM).launch(Regression, config_for(tmp_path))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SlurmOptions(nodes=0), r"launcher\.slurm\.nodes=0 must be at least 1"),
        (SlurmOptions(gpus_per_node=-1), r"launcher\.slurm\.gpus_per_node=-1"),
        (SlurmOptions(sbatch_options=["mem=0"]), r"launcher\.slurm\.sbatch_options has 'mem=0'"),
    ],
)
def test_bad_options_name_the_key(tmp_path: Path, options: SlurmOptions, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        SlurmLauncher(options, program=PROGRAM).launch(Regression, config_for(tmp_path))


def test_command_line_launch_submits_the_same_module(tmp_path: Path) -> None:
    record = fake_sbatch(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    run_dir = tmp_path / "run"
    argv = [f"artifacts.run_dir={run_dir}", "launcher.kind=slurm", "launcher.slurm.nodes=2", "max_steps=9"]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.task.toy_main", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "submitted SLURM job 8123" in proc.stdout
    assert record.read_text().splitlines() == ["--parsable", str(run_dir / SCRIPT_NAME)]
    srun = shlex.split((run_dir / SCRIPT_NAME).read_text().splitlines()[-1])
    assert srun[3:6] == [sys.executable, "-m", "tests.task.toy_main"]
    assert srun[6:] == [
        "--config",
        str(run_dir / CONFIG_NAME),
        "launcher.kind=multi_host",
        f"artifacts.run_dir={run_dir}",
    ]
    assert "max_steps: 9" in (run_dir / CONFIG_NAME).read_text()
    assert not (run_dir / "log.jsonl").exists()  # nothing trained on the submitting host
