"""The one place environment variables are read, each validated with its legal values."""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from xax.core.errors import LaunchError


def user_cache_dir() -> Path:
    """The user's cache folder for xax: ``$XDG_CACHE_HOME/xax``, else ``~/.cache/xax``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "xax"


def is_interactive_terminal(stream_isatty: bool) -> bool:
    """Whether progress bars may redraw in place: a TTY and not a dumb terminal."""
    return stream_isatty and os.environ.get("TERM", "") != "dumb"


def find_executable(name: str) -> str | None:
    """The full path of the program ``name`` found on ``$PATH``, or None."""
    return shutil.which(name)


@dataclass(frozen=True)
class SlurmStep:
    """The SLURM job step (an ``srun``) this process runs in.

    Attributes:
        job_id: ``SLURM_JOB_ID``.
        node_list: ``SLURM_STEP_NODELIST``, the step's hosts in SLURM's compressed form.
        num_tasks: ``SLURM_NTASKS``, processes in the step.
        task_id: ``SLURM_PROCID``, this process's rank in the step.
        local_task_id: ``SLURM_LOCALID``, this process's rank on its node.
        num_nodes: ``SLURM_STEP_NUM_NODES`` (else ``SLURM_NNODES``), nodes in the step.
    """

    job_id: int
    node_list: str
    num_tasks: int
    task_id: int
    local_task_id: int
    num_nodes: int


def _slurm_int(name: str, minimum: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value.isdigit() or int(value) < minimum:
        raise LaunchError(
            f"${name}={value!r} is not an integer >= {minimum}; start the processes with srun inside a SLURM job"
        )
    return int(value)


def slurm_job_id() -> str | None:
    """``SLURM_JOB_ID`` when this process runs inside a SLURM job (an sbatch or salloc), else None."""
    return os.environ.get("SLURM_JOB_ID", "").strip() or None


def slurm_step() -> SlurmStep | None:
    """The SLURM job step this process was started in by ``srun``, or None outside one.

    Raises:
        LaunchError: When the step's variables are present but one is missing or not a number.
    """
    node_list = os.environ.get("SLURM_STEP_NODELIST", "").strip()
    if not node_list:
        return None
    nodes_key = "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in os.environ else "SLURM_NNODES"
    step = SlurmStep(
        job_id=_slurm_int("SLURM_JOB_ID", 0),
        node_list=node_list,
        num_tasks=_slurm_int("SLURM_NTASKS", 1),
        task_id=_slurm_int("SLURM_PROCID", 0),
        local_task_id=_slurm_int("SLURM_LOCALID", 0),
        num_nodes=_slurm_int(nodes_key, 1),
    )
    if step.task_id >= step.num_tasks:
        raise LaunchError(f"$SLURM_PROCID={step.task_id} is not below $SLURM_NTASKS={step.num_tasks}")
    return step


def s3_endpoint() -> str | None:
    """The S3 endpoint URL set for the AWS tools (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``;
    an S3-compatible server such as MinIO), or None for AWS itself."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def aws_region() -> str | None:
    """The AWS region set for the AWS tools (``AWS_REGION``, else ``AWS_DEFAULT_REGION``), or None."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def aws_keys_in_environment() -> bool:
    """Whether AWS credentials are given by ``AWS_ACCESS_KEY_ID`` (and its secret) in the environment."""
    return bool(os.environ.get("AWS_ACCESS_KEY_ID", "").strip())


# Variables that change what a run computes or how: compiler and runtime switches, device
# visibility, thread counts, hash seeds. Never the whole environment, which holds credentials.
_RECORDED_PREFIXES = ("XLA_", "JAX_", "LIBTPU_", "TPU_", "TF_CPP_", "NCCL_", "CUDA_", "CUDNN_", "ROCR_", "HIP_")
_RECORDED_NAMES = frozenset(
    {
        "NVIDIA_TF32_OVERRIDE",
        "PYTHONHASHSEED",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "TF_FORCE_GPU_ALLOW_GROWTH",
    }
)
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")


def is_secret_looking(name: str) -> bool:
    """Whether an environment variable's name suggests it holds a credential (``WANDB_API_KEY``)."""
    upper = name.upper()
    return any(word in upper for word in _SECRET_WORDS)


def recorded_environment() -> dict[str, str]:
    """The environment variables a run's provenance records, by name: those of an allow-list that can
    change its numbers or its devices (``XLA_FLAGS``, ``JAX_*``, ``CUDA_VISIBLE_DEVICES``,
    ``NVIDIA_TF32_OVERRIDE``, ``OMP_NUM_THREADS``, ...), leaving out any whose name looks like a
    credential's (KEY, TOKEN, SECRET, PASSWORD, ...)."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if (name in _RECORDED_NAMES or name.startswith(_RECORDED_PREFIXES)) and not is_secret_looking(name)
    }
