"""``xax repeat``: a tiny task over 3 seeds, and the interval arithmetic against Student's t."""

import json
import math
from pathlib import Path

import pytest
import scipy.stats

import xax
from xax.cli import main
from xax.task.repeat import Interval, t_interval, table_lines


def test_interval_matches_students_t_tables_and_scipy() -> None:
    # Printed tables: t(0.975, 2) = 4.303, t(0.975, 7) = 2.365.
    small = t_interval([1.0, 2.0, 3.0])
    assert small.mean == 2.0 and small.half_width == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
    values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # mean 5, sample std sqrt(32 / 7)
    wide = t_interval(values)
    assert wide.mean == 5.0 and wide.half_width == pytest.approx(2.365 * math.sqrt(32 / 7) / math.sqrt(8), rel=1e-3)
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=5.0, scale=scipy.stats.sem(values))
    assert (wide.low, wide.high) == pytest.approx((low, high), rel=1e-12)
    assert math.isnan(t_interval([1.5]).half_width)


def test_two_configs_are_separate_only_when_their_intervals_do_not_meet() -> None:
    a = {"valid/loss": Interval(1.0, 0.1, 3, (0.9, 1.0, 1.1)), "valid/acc": Interval(0.5, 0.2, 3, (0.3, 0.5, 0.7))}
    b = {"valid/loss": Interval(1.3, 0.1, 3, (1.2, 1.3, 1.4)), "valid/acc": Interval(0.6, 0.2, 3, (0.4, 0.6, 0.8))}
    lines = table_lines({"a": a, "b": b}, [0, 1, 2])
    rows = {line.split()[0]: line for line in lines[2:]}
    assert rows["valid/loss"].endswith("separate") and rows["valid/acc"].endswith("overlap")
    assert "1 ± 0.1" in rows["valid/loss"] and "1.3 ± 0.1" in rows["valid/loss"]


def test_repeat_runs_each_seed_in_its_own_directory_and_reports_the_final_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repeat"
    argv = ["repeat", "3", "tests.task.toy:Regression", "max_steps=8", "batch_size=32", "log.stdout=false"]
    assert main([*argv, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    finals = []
    for seed in range(3):
        history = xax.read_history(root / f"seed_{seed}", phase="valid")
        assert (root / f"seed_{seed}" / "config.yaml").read_text().count(f"seed: {seed}\n") == 1
        finals.append(history[-1]["scalars"]["loss"])
    assert len(set(finals)) == 3  # three different seeds gave three different results
    document = json.loads((root / "repeat.json").read_text())
    loss = document["configs"]["runs"]["metrics"]["valid/loss"]
    assert loss["values"] == finals and document["seeds"] == [0, 1, 2]
    expected = t_interval(finals)
    assert loss["mean"] == pytest.approx(expected.mean) and loss["half_width"] == pytest.approx(expected.half_width)
    assert f"valid/loss       {expected.mean:.6g} ± {expected.half_width:.3g}" in out
    assert "train/steps_per_second" not in out  # the machine's speed is no result


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["1", "tests.task.toy:Regression"], "an interval needs at least 2 seeds"),
        (["2", "tests.task.toy:Regression", "seed=3"], "xax repeat sets seed itself"),
        (["--seeds", "0,x", "tests.task.toy:Regression"], "--seeds '0,x' is not a comma-separated list"),
        (["tests.task.toy:Regression"], "give the number of seeds"),
    ],
)
def test_a_bad_request_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["repeat", *args, "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_compare_runs_the_second_config_over_the_same_seeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "repeat"
    argv = ["repeat", "3", "tests.task.toy:Regression", "max_steps=8", "batch_size=32", "log.stdout=false"]
    assert main([*argv, "--root", str(root), "--compare", "learning_rate=0.0"]) == 0
    out = capsys.readouterr().out
    document = json.loads((root / "repeat.json").read_text())
    # The second config is the first with the override on top: 8 steps, no learning.
    assert document["configs"]["b"]["overrides"][-1] == "learning_rate=0.0"
    for label in ("a", "b"):
        for seed in range(3):
            assert len(xax.read_history(root / label / f"seed_{seed}", phase="train")) > 0
    a, b = (document["configs"][label]["metrics"]["valid/loss"] for label in ("a", "b"))
    separate = a["high"] < b["low"] or b["high"] < a["low"]
    assert document["overlap"]["valid/loss"] is not separate
    row = next(line for line in out.splitlines() if line.startswith("valid/loss"))
    assert row.endswith("separate" if separate else "overlap")


@pytest.mark.slow
def test_jobs_run_the_seeds_at_once_in_processes_of_their_own_with_the_same_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two seeds at once, each in a process of its own: they overlap in time and give bitwise the
    final metrics of the same seeds run one after another in this process."""
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4")  # the processes see the devices this one has
    argv = ["repeat", "--seeds", "0,1", "tests.task.toy:Regression", "max_steps=8", "batch_size=32", "log.stdout=false"]
    assert main([*argv, "--root", str(tmp_path / "serial")]) == 0
    assert main([*argv, "--root", str(tmp_path / "jobs"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    serial = json.loads((tmp_path / "serial" / "repeat.json").read_text())["configs"]["runs"]["metrics"]
    jobs = json.loads((tmp_path / "jobs" / "repeat.json").read_text())["configs"]["runs"]["metrics"]
    assert serial["valid/loss"]["values"] == jobs["valid/loss"]["values"]
    assert "seed 0 started" in out and "seed 1 ended (exit code 0)" in out
    spans = []
    for seed in (0, 1):
        run_dir = tmp_path / "jobs" / f"seed_{seed}"
        assert "done: 8 steps" in (tmp_path / "jobs" / f"seed_{seed}.log").read_text()
        spans.append(((run_dir / "config.yaml").stat().st_mtime, (run_dir / "log.jsonl").stat().st_mtime))
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a  # the two runs were alive at the same time


def test_jobs_requests_are_checked_before_any_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from xax.task.repeat import resolve_jobs, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus() == ["2", "5"] and resolve_jobs("auto", ["2", "5"]) == 2
    with pytest.raises(xax.ConfigError, match="with 2 GPUs: one run per GPU"):
        resolve_jobs("3", ["2", "5"])
    with pytest.raises(xax.ConfigError, match="found no GPU"):
        resolve_jobs("auto", [])
    assert resolve_jobs("3", []) == 3  # on the CPU, as many as asked
    failing = ["repeat", "2", "tests.task.toy:Regression", "--jobs", "0", "--root", str(tmp_path / "r")]
    assert main(failing) == 2 and not (tmp_path / "r").exists()
