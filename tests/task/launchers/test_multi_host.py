"""The multi-host launcher: settings from the config or SLURM, and a real two-process CPU run."""

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from tests.task.toy import ROOT, Regression, RegressionConfig, read_jsonl
from xax.checkpoint import checkpoint_steps
from xax.core.errors import LaunchError
from xax.task.launchers import LauncherOptions, MultiHostLauncher, Placement, get_launcher
from xax.task.launchers.multi_host import (
    DistributedOptions,
    DistributedSettings,
    coordinator_bind_address,
    first_host,
    initialize,
    resolve_settings,
    slurm_coordinator,
    wait_for_coordinator,
    wants_multi_host,
)
from xax.utils.env import SlurmStep, slurm_step

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@pytest.fixture
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*SLURM_VARS, "SLURM_STEP_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def set_step(monkeypatch: pytest.MonkeyPatch, *, tasks: int, nodes: int, rank: int, local: int) -> None:
    values = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-008,010],login", "SLURM_NTASKS": str(tasks)}
    values |= {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_STEP_NUM_NODES": str(nodes)}
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("node_list", "host"),
    [("node001", "node001"), ("node001,host2", "node001"), ("node[001-015],host2", "node001"), ("a-b[7,9]", "a-b7")],
)
def test_first_host_of_a_slurm_node_list(node_list: str, host: str) -> None:
    assert first_host(node_list) == host


def test_slurm_step_is_read_from_the_environment(no_slurm: pytest.MonkeyPatch) -> None:
    assert slurm_step() is None
    set_step(no_slurm, tasks=3, nodes=3, rank=2, local=0)
    step = slurm_step()
    assert step == SlurmStep(
        job_id=4242, node_list="gpu[007-008,010],login", num_tasks=3, task_id=2, local_task_id=0, num_nodes=3
    )
    # The port jax.distributed derives from the job id, so every task agrees on it.
    assert slurm_coordinator(step) == f"gpu007:{4242 % 4096 + 61440}"
    settings = resolve_settings(DistributedOptions(), step)
    assert (settings.num_processes, settings.process_id, settings.local_device_ids) == (3, 2, None)
    assert settings.source == "SLURM job 4242"


def test_several_tasks_per_node_get_one_device_each(no_slurm: pytest.MonkeyPatch) -> None:
    set_step(no_slurm, tasks=8, nodes=2, rank=5, local=1)
    assert resolve_settings(DistributedOptions(), slurm_step()).local_device_ids == (1,)
    explicit = resolve_settings(DistributedOptions(local_device_ids=[0, 1]), slurm_step())
    assert explicit.local_device_ids == (0, 1)


def test_config_values_override_slurm(no_slurm: pytest.MonkeyPatch) -> None:
    set_step(no_slurm, tasks=2, nodes=2, rank=1, local=0)
    options = DistributedOptions(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    settings = resolve_settings(options, slurm_step())
    assert (settings.coordinator_address, settings.num_processes, settings.process_id) == ("10.0.0.1:1234", 4, 3)
    assert settings.source == "launcher config"


def test_malformed_slurm_variable_is_named(no_slurm: pytest.MonkeyPatch) -> None:
    set_step(no_slurm, tasks=2, nodes=2, rank=0, local=0)
    no_slurm.setenv("SLURM_NTASKS", "two")
    with pytest.raises(LaunchError, match=r"\$SLURM_NTASKS='two'"):
        slurm_step()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            DistributedOptions(),
            r"launcher.distributed.coordinator_address is not set and this process is not in a SLURM",
        ),
        (DistributedOptions(coordinator_address="h:1"), r"launcher.distributed.num_processes is not set"),
        (DistributedOptions(coordinator_address="h:1", num_processes=2), r"launcher.distributed.process_id is not"),
        (DistributedOptions(coordinator_address="h", num_processes=2, process_id=0), r"coordinator_address='h' is not"),
        (DistributedOptions(coordinator_address="h:1", num_processes=2, process_id=2), r"process_id=2 must be from 0"),
        (
            DistributedOptions(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids=[1, 1]),
            r"local_device_ids=\[1, 1\] must be distinct",
        ),
    ],
)
def test_missing_or_bad_settings_name_the_key(
    no_slurm: pytest.MonkeyPatch, options: DistributedOptions, message: str
) -> None:
    with pytest.raises(LaunchError, match=message):
        resolve_settings(options, slurm_step())


def test_inside_a_job_but_outside_srun_says_so(no_slurm: pytest.MonkeyPatch) -> None:
    no_slurm.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(LaunchError, match="runs in SLURM job 77 but not in a job step; start it with srun"):
        resolve_settings(DistributedOptions(), slurm_step())


def test_auto_picks_multi_host_only_for_several_processes(no_slurm: pytest.MonkeyPatch) -> None:
    assert not wants_multi_host(DistributedOptions())
    assert wants_multi_host(DistributedOptions(num_processes=2))
    assert not wants_multi_host(DistributedOptions(num_processes=1))
    set_step(no_slurm, tasks=1, nodes=1, rank=0, local=0)
    assert not wants_multi_host(DistributedOptions())
    set_step(no_slurm, tasks=2, nodes=2, rank=0, local=0)
    assert wants_multi_host(DistributedOptions())
    assert isinstance(get_launcher(LauncherOptions(kind="auto")), MultiHostLauncher)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def test_unreachable_coordinator_is_a_launch_error() -> None:
    port = free_port()
    with pytest.raises(
        LaunchError, match=rf"nothing listens at launcher.distributed.coordinator_address=localhost:{port}"
    ):
        wait_for_coordinator(f"localhost:{port}", timeout_s=0.5)
    with pytest.raises(LaunchError, match=r"unknown host 'no-such-host\.invalid'"):
        wait_for_coordinator("no-such-host.invalid:1234", timeout_s=0.5)


def test_starting_after_jax_is_a_launch_error() -> None:
    jax.devices()  # JAX has started, as in a program that computes before calling launch
    settings = resolve_settings(
        DistributedOptions(coordinator_address="localhost:1", num_processes=2, process_id=0), None
    )
    with pytest.raises(LaunchError, match=r"must set up jax\.distributed before JAX starts its devices"):
        initialize(settings, timeout_s=1)


# ---- a real run of two processes on CPU ------------------------------------------------------

COMMON = (
    "compile.cache=false",
    "log.tensorboard=false",
    "log.every_n_steps=1",
    "log.every_n_seconds=null",
    "valid_every_n_steps=2",
    "checkpoint.every_n_steps=2",
)


def start_two_processes(run_dir: Path, *overrides: str, stdout: Any = subprocess.PIPE) -> list[subprocess.Popen]:
    """Starts the toy regression in two processes of two CPU devices each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "SLURM_"))}
    env |= {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    port = free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.task.toy_main",
                f"artifacts.run_dir={run_dir}",
                "launcher.kind=multi_host",
                f"launcher.distributed.coordinator_address=localhost:{port}",
                "launcher.distributed.num_processes=2",
                f"launcher.distributed.process_id={rank}",
                "launcher.distributed.init_timeout_s=60",
                *COMMON,
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]


def run_two_processes(run_dir: Path, *overrides: str) -> list[str]:
    """Runs the toy regression in two processes of two CPU devices each; returns their stdouts."""
    procs = start_two_processes(run_dir, *overrides)
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=150)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def losses(run_dir: Path, phase: str) -> dict[int, float]:
    records = [r for r in read_jsonl(run_dir / "log.jsonl") if r["phase"] == phase and "loss" in r["scalars"]]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{phase} steps logged twice: {steps}"
    return {r["step"]: r["scalars"]["loss"] for r in records}


def scalars(run_dir: Path, name: str) -> dict[int, float]:
    """``name``'s logged values by step (any phase)."""
    return {r["step"]: r["scalars"][name] for r in read_jsonl(run_dir / "log.jsonl") if name in r["scalars"]}


def test_two_processes_train_resume_and_match_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "two"
    # Device-resident data first (every process gathers its rows of each batch by index) ...
    out_0, out_1 = run_two_processes(run_dir, "max_steps=4")
    assert "devices=4 steps=4" in out_0 and "devices=4 steps=4" in out_1
    assert checkpoint_steps(run_dir / "checkpoints") == [2, 4]
    # Only process 0 logs and writes the run's metadata.
    assert "\nstep 4/4 (100%)" in out_0 and "\nstep " not in out_1
    assert "launcher.distributed.process_id=0" in (run_dir / "command.txt").read_text()
    assert sorted(losses(run_dir, "train")) == [1, 2, 3, 4]
    assert (run_dir / "versions.json").is_file() and (run_dir / "config.yaml").is_file()

    # ... then a resumed run reading only each process's rows from the host.
    # Media from outputs sharded across the processes too (read on the logging thread).
    media = ("media=true", "log.heavy_every_n_steps=3")
    out_0, _ = run_two_processes(run_dir, "max_steps=7", "resume=auto", "data.device_resident_max_mb=0", *media)
    assert "devices=4 steps=7" in out_0
    assert checkpoint_steps(run_dir / "checkpoints") == [4, 6, 7]
    two_train, two_valid = losses(run_dir, "train"), losses(run_dir, "valid")
    assert sorted(two_train) == list(range(1, 8))  # resumed at step 5, not restarted
    # Process 0 recorded each start's provenance: the second ran the step taking whole batches.
    first, second = json.loads((run_dir / "provenance.json").read_text())["starts"]
    assert (first["start_step"], second["start_step"]) == (0, 4)
    assert [start["jax"]["process_count"] for start in (first, second)] == [2, 2]
    assert first["step"]["sha256"] != second["step"]["sha256"]

    one_dir = tmp_path / "one"
    Regression.launch(
        RegressionConfig(batch_size=32, max_steps=7),
        argv=[f"artifacts.run_dir={one_dir}", "launcher.kind=multi_device", "log.stdout=false", *COMMON, *media],
    )
    one_train, one_valid = losses(one_dir, "train"), losses(one_dir, "valid")
    assert one_train[7] < 0.5 * one_train[1]  # it learns, so equal losses are not equal constants
    np.testing.assert_allclose([two_train[s] for s in one_train], list(one_train.values()), rtol=1e-5)
    assert sorted(two_valid) == sorted(one_valid) == [2, 4, 6, 7]
    np.testing.assert_allclose([two_valid[s] for s in one_valid], list(one_valid.values()), rtol=1e-5)
    two_media, one_media = scalars(run_dir, "media_output"), scalars(one_dir, "media_output")
    assert sorted(two_media) == [7] and sorted(one_media) == [3, 6, 7]  # the resumed run: steps 5..7
    np.testing.assert_allclose(two_media[7], one_media[7], rtol=1e-5)


def step_based(config: RegressionConfig) -> RegressionConfig:
    """The config a task validated in a lockstep (multi_host) run goes on with."""
    task = Regression(config)
    task.placement = Placement(tuple(jax.devices()[:1]), lockstep=True)
    task.validate_config()
    return task.config


def test_timed_cadences_are_refused_or_turned_off() -> None:
    with pytest.raises(LaunchError, match=r"max_seconds=60\.0 is timed.*set max_seconds=null and use max_steps"):
        step_based(RegressionConfig(max_seconds=60.0))
    config = RegressionConfig()
    config.checkpoint.every_n_seconds = 600.0
    with pytest.raises(LaunchError, match=r"checkpoint\.every_n_seconds=600\.0 is timed"):
        step_based(config)
    adjusted = step_based(RegressionConfig(max_steps=5))
    assert isinstance(adjusted, RegressionConfig)
    assert adjusted.log.heavy_every_n_seconds is None and adjusted.max_steps == 5


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "signal"
    log_0 = tmp_path / "out_0.txt"
    with log_0.open("w") as out:
        procs = start_two_processes(run_dir, "max_steps=100000", "checkpoint.every_n_steps=100000", stdout=out)
    try:
        deadline = time.monotonic() + 120
        while "\nstep 3/100000 " not in log_0.read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), log_0.read_text()[-2000:]
            time.sleep(0.2)
        # Only process 1 is told to stop; process 0 must stop with it rather than wait in a collective.
        procs[1].send_signal(signal.SIGTERM)
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    stopped = [
        int(line.split(" at step ")[1].split(";")[0])
        for line in "".join(errors).splitlines()
        if "interrupted by SIGTERM at step" in line
    ]
    assert len(stopped) == 2 and stopped[0] == stopped[1], stopped  # both processes, the same step
    assert checkpoint_steps(run_dir / "checkpoints") == [stopped[0]]


def test_both_processes_rewind_past_a_non_finite_step_together(tmp_path: Path) -> None:
    run_dir = tmp_path / "rewind"
    # Row 100 lands in step 11 of epoch 0 (batch 32, 512 rows, seed 0; see test_nan_policy). Device-resident
    # data holding a NaN is placed on both processes too.
    overrides = ("max_steps=16", "nan.policy=rewind", "poison_row=100", "valid_every_n_steps=null")
    outs = run_two_processes(run_dir, *overrides)
    assert all("devices=4 steps=16" in out for out in outs)
    records = [r for r in read_jsonl(run_dir / "log.jsonl") if r["phase"] == "train" and "loss" in r["scalars"]]
    # Step 11 twice: its non-finite loss (update not applied), then the rewound run's, on the next batch.
    assert [r["step"] for r in records] == [*range(1, 12), *range(11, 17)]
    losses_11 = [r["scalars"]["loss"] for r in records if r["step"] == 11]
    assert losses_11[0] == "nan" and np.isfinite(losses_11[1])
    assert all(np.isfinite(r["scalars"]["loss"]) for r in records if r["scalars"]["loss"] != "nan")
    assert checkpoint_steps(run_dir / "checkpoints")[-1] == 16


# ---- where the coordinator listens -----------------------------------------------------------


def settings_for(address: str, num_processes: int = 2, bind: str | None = None) -> DistributedSettings:
    options = DistributedOptions(
        coordinator_address=address, num_processes=num_processes, process_id=0, coordinator_bind_address=bind
    )
    return resolve_settings(options, None)


def test_coordinator_binds_only_where_the_processes_reach_it(
    no_slurm: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # On one host: loopback.
    assert coordinator_bind_address(settings_for("localhost:1234")) == "localhost:1234"
    assert coordinator_bind_address(settings_for("127.0.0.1:1234")) == "127.0.0.1:1234"
    assert coordinator_bind_address(settings_for("[::1]:1234")) == "[::1]:1234"
    assert coordinator_bind_address(settings_for("10.0.0.1:1234", num_processes=1)) == "localhost:1234"
    # A SLURM step on one node serves the coordinator on loopback too.
    set_step(no_slurm, tasks=4, nodes=1, rank=0, local=0)
    assert (
        resolve_settings(DistributedOptions(), slurm_step()).coordinator_address == f"localhost:{4242 % 4096 + 61440}"
    )
    # Across hosts: the coordinator address's own interface, or the option.
    assert coordinator_bind_address(settings_for("10.0.0.1:1234")) == "10.0.0.1:1234"
    assert coordinator_bind_address(settings_for("10.0.0.1:1234", bind="[::]:1234")) == "[::]:1234"
    with pytest.raises(LaunchError, match=r"launcher\.distributed\.coordinator_bind_address='10\.0\.0\.1' is not HOST"):
        settings_for("10.0.0.1:1234", bind="10.0.0.1")
    # A host name that resolves to loopback here only (an /etc/hosts entry) must stay reachable from the others.
    loopback = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", 1234))]
    no_slurm.setattr(socket, "getaddrinfo", lambda *args, **kwargs: loopback)
    with caplog.at_level("WARNING"):
        assert coordinator_bind_address(settings_for("gpu007:1234")) == "[::]:1234"
    assert "set launcher.distributed.coordinator_bind_address=IP:1234" in caplog.text


# Run in each of two processes: join through the launcher, then process 0 prints the addresses its
# coordinator port listens on (while both are joined, before shutting down together).
LISTENERS = """
import sys

import jax
import psutil

from xax.task.launchers import MultiHostLauncher
from xax.task.launchers.multi_host import DistributedOptions

rank, port = int(sys.argv[1]), int(sys.argv[2])
options = DistributedOptions(
    coordinator_address=f"localhost:{port}", num_processes=2, process_id=rank, init_timeout_s=60
)
placement = MultiHostLauncher(options).place()
assert len(placement.devices) == 2, placement
if rank == 0:
    for conn in psutil.Process().net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            print(conn.laddr.ip)
jax.distributed.shutdown()
"""


def test_two_process_coordinator_listens_on_loopback_only() -> None:
    """A real two-process start on one host: process 0's coordinator port is bound on loopback only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "SLURM_"))}
    env |= {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LISTENERS, str(rank), str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    listening = outputs[0][0].split()
    assert listening, "process 0 listens nowhere on the coordinator port"
    # gRPC binds a dual-stack socket, so 127.0.0.1 may show as ::ffff:127.0.0.1.
    ips = [ipaddress.ip_address(ip) for ip in listening]
    ips = [getattr(ip, "ipv4_mapped", None) or ip for ip in ips]
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert all(ip.is_loopback for ip in ips), f"the coordinator listens on {listening}, not only on loopback"
