"""Submits the task as a SLURM job: N nodes x G GPUs, one process per node, joined by ``multi_host``.

The launcher trains nothing itself. It writes the resolved config (``slurm_config.yaml``) and an
sbatch script (``job.sbatch``) into the run directory, or ``launcher.slurm.script_dir``, and
submits the script with ``sbatch``. The job runs, on every node, the program that called
``launch`` with that config and ``launcher.kind=multi_host``, so its processes find each other
through the SLURM job step and write into the same run directory.
"""

import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from typing_extensions import override

from xax.core.config import field
from xax.core.config_io import config_to_yaml
from xax.core.errors import LaunchError
from xax.core.state import State
from xax.task.launchers.base import Launcher, Placement, TaskClass
from xax.task.mixins.artifacts import ArtifactsConfig, local_run_dir, make_run_location
from xax.utils.env import find_executable

SCRIPT_NAME = "job.sbatch"
CONFIG_NAME = "slurm_config.yaml"
_SUBMIT_TIMEOUT_S = 120.0


@dataclass
class SlurmOptions:
    nodes: int = field(1, help="slurm: nodes to run on, one process per node")
    gpus_per_node: int = field(8, help="slurm: GPUs per node (8: a whole HGX node; 0 for CPU-only nodes)")
    partition: str | None = field(None, help="slurm: partition (None: the cluster's default)")
    time: str | None = field(None, help="slurm: time limit, e.g. 1-00:00:00 (None: the partition's)")
    account: str | None = field(None, help="slurm: account charged (None: the user's default)")
    job_name: str | None = field(None, help="slurm: job name (None: the task's name)")
    sbatch_options: list[str] = field([], help="slurm: more sbatch options, one #SBATCH line each, e.g. [--mem=0]")
    setup: list[str] = field([], help="slurm: shell lines the job runs before srun, e.g. ['source .venv/bin/activate']")
    script_dir: str | None = field(None, help="slurm: folder for the script and its config (None: the run directory)")
    dry_run: bool = field(False, help="slurm: write the script without submitting it")


def current_program() -> list[str]:
    """The command that started this program: ``python -m MODULE`` or ``python /path/SCRIPT.py``.

    Raises:
        LaunchError: In an interactive session, which has no program to re-run.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
    path = getattr(main, "__file__", None)
    if path:
        return [sys.executable, str(Path(path).resolve())]
    raise LaunchError(
        "launcher.kind=slurm re-runs the program that called launch, and an interactive session has none; "
        "run it as python -m MODULE or python SCRIPT.py"
    )


def sbatch_script(
    options: SlurmOptions, *, job_name: str, command: Sequence[str], workdir: Path, output_dir: Path
) -> str:
    """The text of an sbatch script running ``command`` once per node under ``srun``.

    Args:
        options: ``launcher.slurm``.
        job_name: The job's name.
        command: The program and its arguments, run by every task.
        workdir: The folder the job starts in (where ``python -m`` finds the task's module).
        output_dir: Where SLURM writes the job's output, ``slurm-<job id>.out``.

    Returns:
        The script.
    """
    directives = [
        f"--job-name={job_name}",
        f"--nodes={options.nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={options.gpus_per_node}"] if options.gpus_per_node > 0 else []),
        *([f"--partition={options.partition}"] if options.partition else []),
        *([f"--time={options.time}"] if options.time else []),
        *([f"--account={options.account}"] if options.account else []),
        f"--output={output_dir / 'slurm-%j.out'}",
        *options.sbatch_options,
    ]
    srun = ["srun", f"--nodes={options.nodes}", "--ntasks-per-node=1", *command]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {directive}" for directive in directives),
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        *options.setup,
        shlex.join(srun),
        "",
    ]
    return "\n".join(lines)


def check_options(options: SlurmOptions) -> None:
    """Raises a LaunchError naming the first ``launcher.slurm`` option that cannot make a job."""
    if options.nodes < 1:
        raise LaunchError(f"launcher.slurm.nodes={options.nodes} must be at least 1")
    if options.gpus_per_node < 0:
        raise LaunchError(f"launcher.slurm.gpus_per_node={options.gpus_per_node} must be 0 or more")
    for line in options.sbatch_options:
        if not line.startswith("-") or "\n" in line:
            raise LaunchError(
                f"launcher.slurm.sbatch_options has {line!r}; give sbatch options as they are written after #SBATCH, "
                "e.g. --mem=0"
            )


def submit(script: Path) -> str:
    """Submits ``script`` with ``sbatch --parsable``; returns the job id.

    Raises:
        LaunchError: When sbatch is not on PATH, fails, or does not answer.
    """
    sbatch = find_executable("sbatch")
    if sbatch is None:
        raise LaunchError(
            f"sbatch is not on PATH, so {script} was written but not submitted; run on a SLURM login node, or set "
            "launcher.slurm.dry_run=true to only write the script"
        )
    try:
        result = subprocess.run(
            [sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=_SUBMIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise LaunchError(f"running {sbatch} failed ({error}); submit {script} by hand") from error
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip() or "no message").splitlines()[0]
        raise LaunchError(
            f"sbatch rejected {script} (exit {result.returncode}: {reason}); fix the launcher.slurm options"
        )
    return result.stdout.strip().split(";")[0]


class SlurmLauncher(Launcher):
    """Writes an sbatch script for the task and submits it (see the module docstring).

    Args:
        options: ``launcher.slurm``.
        program: The command every task runs, before its config arguments; None re-runs this program.
    """

    def __init__(self, options: SlurmOptions, program: Sequence[str] | None = None) -> None:
        self.options = options
        self.program = list(program) if program is not None else None

    @override
    def place(self) -> Placement:
        raise LaunchError(
            "launcher.kind=slurm places nothing on devices here; the job it submits runs launcher.kind=multi_host"
        )

    def folders(self, task_class: TaskClass, config: object) -> tuple[str, Path, Path]:
        """Where the job's run is stored, its local folder (the job's output goes there) and the
        folder for the script (made if missing).

        The run is ``artifacts.run_dir``, else the next numbered one, made now so that the job and
        its script share it. For a run stored at a URL, the local folder is the copy its files are
        uploaded from.
        """
        script_dir = Path(self.options.script_dir).expanduser().absolute() if self.options.script_dir else None
        if not isinstance(config, ArtifactsConfig):
            if script_dir is None:
                raise LaunchError("this task has no run directory; set launcher.slurm.script_dir=<folder>")
            script_dir.mkdir(parents=True, exist_ok=True)
            return str(script_dir), script_dir, script_dir
        location = make_run_location(config.artifacts, task_class.task_name())
        run_dir = local_run_dir(location)
        run_dir.mkdir(parents=True, exist_ok=True)
        if script_dir is not None:
            script_dir.mkdir(parents=True, exist_ok=True)
        return str(location), run_dir, script_dir or run_dir

    @override
    def launch(self, task_class: TaskClass, config: object) -> State:
        """Writes the script (and submits it unless ``dry_run``); returns the untouched State."""
        check_options(self.options)
        program = self.program if self.program is not None else current_program()
        location, run_dir, script_dir = self.folders(task_class, config)
        config_path = script_dir / CONFIG_NAME
        config_path.write_text(config_to_yaml(config), encoding="utf-8")
        overrides = ["launcher.kind=multi_host"]
        if isinstance(config, ArtifactsConfig):
            overrides.append(f"artifacts.run_dir={location}")
        command = [*program, "--config", str(config_path), *overrides]
        script = sbatch_script(
            self.options,
            job_name=self.options.job_name or task_class.task_name(),
            command=command,
            workdir=Path.cwd(),
            output_dir=run_dir,
        )
        script_path = script_dir / SCRIPT_NAME
        script_path.write_text(script, encoding="utf-8")
        if self.options.dry_run:
            print(f"wrote {script_path} (launcher.slurm.dry_run=true: not submitted)")
            return State()
        job_id = submit(script_path)
        print(f"submitted SLURM job {job_id}: {script_path}; its output goes to {run_dir / f'slurm-{job_id}.out'}")
        return State()
