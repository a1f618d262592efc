"""Runs stored in an object store: trained into a real S3 API (moto's server, on localhost),
stopped, resumed from the bucket on a machine without the local copy, and warm-started from it;
URLs that cannot be used."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

import xax
from tests.task.toy import Regression, RegressionConfig, final_params, read_jsonl, start_toy
from xax.checkpoint import CheckpointManager, CheckpointOptions, checkpoint_steps, restore_latest
from xax.cli import main, open_checkpoint, read_arrays
from xax.task.mixins.artifacts import next_remote_run_dir

BUCKET = "xax-runs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 API served by moto on a free local port, with one bucket; stopped by its process id."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
                time.sleep(0.2)
        request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        yield endpoint
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def s3(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The AWS settings of the server for this test (the AWS tools' own variables), the local copy
    of remote runs under ``tmp_path``, and the working directory there (so that a URL taken for a
    local path would show as a folder in it)."""
    import s3fs

    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    s3fs.S3FileSystem.clear_instance_cache()  # made with another test's settings
    yield f"s3://{BUCKET}/{tmp_path.name}"
    s3fs.S3FileSystem.clear_instance_cache()


def launch(run_dir: str, *overrides: str, max_steps: int, learning_rate: float = 0.05) -> Regression:
    tasks: list[Regression] = []

    class Recorded(Regression):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

    Recorded.launch(
        RegressionConfig(batch_size=32, max_steps=max_steps, learning_rate=learning_rate),
        argv=[
            f"artifacts.run_dir={run_dir}",
            "log.every_n_steps=1",
            "log.every_n_seconds=null",
            "log.stdout=false",
            "compile.cache=false",
            "checkpoint.every_n_steps=3",
            *overrides,
        ],
    )
    return tasks[0]


def assert_trees_equal(a: object, b: object) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def bucket_files(url: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem()
    root = url.removeprefix("s3://")
    return {path.removeprefix(root + "/"): fs.cat_file(path) for path in fs.find(root)}


def test_a_run_stopped_in_s3_resumes_there_bitwise_equal_to_a_local_run_and_warm_starts_another(
    s3: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    straight = launch(str(tmp_path / "local"), max_steps=6)
    url = f"{s3}/run"
    launch(url, max_steps=3)
    first = bucket_files(url)
    assert {"config.yaml", "log.jsonl", "checkpoints/3/commit_success.txt"} <= set(first)
    # Resumed on a machine that never saw the run: its local copy is gone, the bucket holds all.
    mirror = tmp_path / "cache" / "xax" / "remote" / "s3" / url.removeprefix("s3://")
    assert (mirror / "log.jsonl").read_bytes() == first["log.jsonl"]
    for path in sorted(mirror.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    resumed = launch(url, "resume=auto", max_steps=6)

    assert_trees_equal(final_params(straight).params, final_params(resumed).params)
    assert_trees_equal(final_params(straight), final_params(resumed))
    assert checkpoint_steps(f"{url}/checkpoints") == [3, 6]
    files = bucket_files(url)
    records = [json.loads(line) for line in files["log.jsonl"].decode().splitlines()]
    train = [(r["step"], r["scalars"]["loss"]) for r in records if r.get("phase") == "train"]
    local = read_jsonl(tmp_path / "local" / "log.jsonl")
    assert train == [(r["step"], r["scalars"]["loss"]) for r in local if r.get("phase") == "train"]
    history = xax.read_history(url, "train")  # read from the bucket
    assert [(r["step"], r["scalars"]["loss"]) for r in history] == train
    assert [r["step"] for r in records if r.get("event") == "resume"] == [3]
    # The provenance of the first start came back from the bucket: the resume appended its own.
    starts = json.loads(files["provenance.json"])["starts"]
    assert [start["start_step"] for start in starts] == [0, 3]
    assert main(["runs", "diff", str(tmp_path / "local"), url]) == 1  # read from the bucket too
    report = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert report[report.index("4 config") + 1] == "max_steps: 6 -> 3"
    assert "B changed at its start 2 (resumed at step 3):" in report and "max_steps: 3 -> 6" in report
    assert next(line for line in report if line.startswith("train/loss ")).startswith(
        "train/loss same at all 6 logged steps; final "
    )
    assert any(name.startswith("tensorboard/") for name in files)
    assert not (tmp_path / "s3:").exists(), "nothing written under a local folder named after the URL"

    # A new local run warm-started from the bucket, without learning: its weights stay those it
    # started from.
    started = launch(str(tmp_path / "new"), f"warm_start={url}/checkpoints/6", max_steps=1, learning_rate=0.0)
    assert_trees_equal(final_params(resumed).params, final_params(started).params)


@pytest.mark.slow
def test_a_run_killed_while_training_into_s3_resumes_there_bitwise_equal(s3: str, tmp_path: Path) -> None:
    import s3fs

    url = f"{s3}/killed"
    common = [
        "valid_every_n_steps=null",
        "checkpoint.every_n_steps=10",
        "log.every_n_steps=1",
        "log.every_n_seconds=null",
    ]
    proc = start_toy(url, *common, "max_steps=100000", "artifacts.upload_every_n_seconds=1", "log.stdout=false")
    bucket = s3fs.S3FileSystem(use_listings_cache=False)  # sees what the other process writes
    try:
        deadline = time.monotonic() + 240
        while not bucket.exists(f"{url.removeprefix('s3://')}/checkpoints/20/commit_success.txt"):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # mid-step, perhaps mid-save
    finally:
        proc.wait(timeout=60)
    last = checkpoint_steps(f"{url}/checkpoints")[-1]
    assert last >= 20
    # Resumed and uninterrupted, each in its own process as the killed run was.
    for run_dir, resume in ((url, ["resume=auto"]), (str(tmp_path / "local"), [])):
        proc = start_toy(run_dir, *common, *resume, f"max_steps={last + 12}", "log.stdout=false")
        assert proc.wait(timeout=300) == 0, proc.communicate()[1][-3000:]
    checkpoints = [open_checkpoint(run_dir) for run_dir in (url, tmp_path / "local")]
    assert [checkpoint.step for checkpoint in checkpoints] == [last + 12] * 2
    resumed, straight = (read_arrays(checkpoint) for checkpoint in checkpoints)
    assert sorted(resumed) == sorted(straight)
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    history = xax.read_history(url, "train")
    assert [record["step"] for record in history] == list(range(1, last + 13))


def test_checkpoints_in_a_bucket_skip_an_unfinished_write_and_fall_back_past_a_corrupt_one(s3: str) -> None:
    import s3fs

    directory = f"{s3}/checkpoints"
    manager = CheckpointManager(directory, CheckpointOptions(keep_last=5))
    for step in (1, 2, 3):
        manager.save(step, {"w": jnp.full(4, float(step))}, {"step": step})
    manager.wait()
    manager.close()
    assert checkpoint_steps(directory) == [1, 2, 3]
    # A write cut short (no commit file yet) is no checkpoint: not listed, not restored.
    (epath.Path(directory) / "3" / "commit_success.txt").unlink()
    assert checkpoint_steps(directory) == [1, 2]
    # A checkpoint whose array data changed: the restore falls back to the one before and moves
    # the damaged one aside, inside the bucket.
    fs = s3fs.S3FileSystem()
    key = directory.removeprefix("s3://")
    data = sorted(path for path in fs.find(f"{key}/2/state") if "/d/" in path)[0]
    fs.pipe_file(data, bytes(len(fs.cat_file(data))))
    restored = restore_latest(directory, {"w": jnp.zeros(4)})
    assert restored is not None
    assert (restored.step, restored.tree["w"].tolist()) == (1, [1.0] * 4)
    assert checkpoint_steps(directory) == [1]
    assert fs.exists(f"{key}/corrupt/2/commit_success.txt")


def test_numbered_runs_in_a_bucket_claim_distinct_numbers(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from xax.task.mixins import artifacts

    parent = epath.Path(f"{s3}/runs/task")
    assert [next_remote_run_dir(parent).name for _ in range(2)] == ["run_000", "run_001"]

    # Runs that claimed their numbers after this one listed the folder: the claim (a write only
    # if absent) fails for those numbers, and the next free one is taken.
    filesystem = artifacts.filesystem

    def stale_listing(location: epath.Path) -> tuple[object, str]:
        fs, key = filesystem(location)
        monkeypatch.setattr(fs, "ls", lambda *args, **kwargs: [])
        return fs, key

    monkeypatch.setattr(artifacts, "filesystem", stale_listing)
    assert next_remote_run_dir(parent).name == "run_002"


@pytest.mark.parametrize(
    ("key", "location", "message"),
    [
        (
            "artifacts.run_dir",
            "gs://bucket/exp",
            "artifacts.run_dir=gs://bucket/exp: no filesystem for gs:// is installed; pip install gcsfs",
        ),
        ("artifacts.runs_root", "ftp://host/runs", "artifacts.runs_root=ftp://host/runs: ftp:// is not supported"),
        (
            "resume",
            "gs://bucket/exp",
            "resume=gs://bucket/exp: no filesystem for gs:// is installed; pip install gcsfs",
        ),
    ],
    ids=["gs-without-gcsfs", "unsupported-scheme", "resume-gs-without-gcsfs"],
)
def test_an_unusable_url_is_one_line_before_anything_is_made(
    key: str,
    location: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as where gcsfs is not installed
    monkeypatch.chdir(tmp_path)
    argv = [f"{key}={location}", "log.stdout=false"]
    if key == "resume":
        argv.append(f"artifacts.run_dir={tmp_path / 'run'}")
    with pytest.raises(SystemExit) as exit_info:
        Regression.launch(RegressionConfig(batch_size=32, max_steps=1), argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [], "nothing is created"


@pytest.mark.slow
def test_a_run_that_hangs_in_a_bucket_uploads_its_report_before_exiting_124(s3: str) -> None:
    """The watchdog's report is what a cluster user reads after a hang: for a run stored at a URL it
    must reach the bucket (run.log, log.jsonl) before the process ends."""
    from tests.task.mixins.test_watchdog import finish, start

    run = start(s3, "block_after_rows=40", "watchdog.step_s=2", "max_steps=1000", "valid_every_n_steps=null")
    _, err = finish(run)
    assert run.returncode == 124, err[-3000:]
    assert f"watchdog: uploaded the run's files (this report in run.log) to {s3}" in err
    files = bucket_files(s3)
    run_log = files["run.log"].decode()
    assert "watchdog: no progress for" in run_log and "block_forever" in run_log
    assert "watchdog: exiting with code 124" in run_log
    steps = [json.loads(line)["step"] for line in files["log.jsonl"].decode().splitlines() if "phase" in line]
    assert steps and f"last completed step: {steps[-1]} " in run_log
