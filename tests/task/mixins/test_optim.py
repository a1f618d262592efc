"""The ``optim`` group in the real loop: the default ``get_optimizer``, its logged schedule, its checks."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.task.toy import Regression, RegressionConfig, final_params, read_jsonl
from xax.task.mixins.optim import OptimMixin

STARTED: list[Regression] = []


class Own(Regression):
    """The regression task with its own optimizer (SGD at 0.05), remembered when its run starts."""

    def on_run_start(self) -> None:
        STARTED.append(self)
        super().on_run_start()


class FromConfig(Own):
    """The same task with the default optimizer of the ``optim`` group instead of its own."""

    get_optimizer = OptimMixin.get_optimizer


def launch(task: type[Own], run_dir: Path, *overrides: str) -> Regression:
    argv = [
        f"artifacts.run_dir={run_dir}",
        "log.stdout=false",
        "log.tensorboard=false",
        "log.every_n_seconds=null",
        "log.every_n_steps=1",
        "checkpoint.every_n_steps=null",
        "valid_every_n_steps=null",
        *overrides,
    ]
    task.launch(RegressionConfig(batch_size=32, max_steps=12), argv=argv)
    return STARTED[-1]


def test_the_default_optimizer_takes_the_tasks_own_steps_and_logs_its_schedule(tmp_path: Path) -> None:
    # SGD without momentum at the task's own rate: the same weights as the task's optax.sgd(0.05).
    own = launch(Own, tmp_path / "own")
    grouped = launch(FromConfig, tmp_path / "grouped", "optim.name=sgd", "optim.momentum=0.0", "optim.lr=0.05")
    for a, b in zip(
        jax.tree.leaves(final_params(own).params), jax.tree.leaves(final_params(grouped).params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    # A warmup-cosine AdamW over the run's 12 steps: the logged rate is the schedule's (each record holds
    # one step; step s updated the weights at the schedule's count s - 1).
    launch(FromConfig, tmp_path / "cosine", "optim.schedule=cosine", "optim.warmup_steps=4", "optim.lr=0.01")
    records = [r for r in read_jsonl(tmp_path / "cosine" / "log.jsonl") if r["phase"] == "train"]
    steps = [r["step"] for r in records]
    logged = [r["scalars"]["learning_rate"] for r in records]

    def closed_form(t: int) -> float:
        return 0.01 * t / 4 if t < 4 else 0.005 * (1 + math.cos(math.pi * (t - 4) / 8))

    assert steps == list(range(1, 13))
    np.testing.assert_allclose(logged, [closed_form(t - 1) for t in steps], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.name=adam", "optim.name=adam is not one of: adamw, lion, sgd, muon"),
        ("optim.lr=-0.1", "optim.lr=-0.1 must be >= 0"),
        ("optim.warmup_steps=20", "optim.warmup_steps=20 is longer than the schedule's 12 steps"),
        ("optim.decay_pattern=weight[", "optim.decay_pattern='weight[' is not a regex"),
    ],
)
def test_a_bad_value_is_one_line_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        launch(FromConfig, tmp_path / "run", override)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_decaying_schedule_without_a_length_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        launch(FromConfig, tmp_path / "run", "max_steps=null", "max_seconds=5", "optim.schedule=wsd")
    assert exit_info.value.code == 2
    assert "optim.schedule=wsd decays to a last step, but the run has no length" in capsys.readouterr().err


def test_a_resume_that_stretches_a_decaying_schedule_says_the_rate_jumps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cosine over 12 steps, resumed with max_steps=24: at step 12 the run trained near the end of
    its cosine, the new config's cosine is at its middle there. Resumed with the same length, or with
    optim.total_steps fixing the schedule's length, nothing is said."""
    schedule = ("optim.schedule=cosine", "optim.lr=0.01", "optim.min_lr=0.0", "checkpoint.every_n_steps=12")
    launch(FromConfig, tmp_path / "a", *schedule)
    caplog.set_level("WARNING", logger="xax")
    with caplog.at_level("WARNING"):
        launch(FromConfig, tmp_path / "a", *schedule, "resume=auto", "max_steps=24")
    jumps = [r.getMessage() for r in caplog.records if "so the rate jumps" in r.getMessage()]
    old, new = 0.005 * (1 + math.cos(math.pi * 11 / 12)), 0.005 * (1 + math.cos(math.pi * 11 / 24))
    assert jumps == [
        f"optim: step 12 trained at learning rate {old:.4g}; this config's cosine schedule (over 24 steps) gives "
        f"{new:.4g} there, so the rate jumps; set optim.total_steps to the length the run started with to continue "
        "its schedule"
    ]
    caplog.clear()
    launch(FromConfig, tmp_path / "b", *schedule)
    with caplog.at_level("WARNING"):
        launch(FromConfig, tmp_path / "b", *schedule, "resume=auto", "max_steps=24", "optim.total_steps=12")
    assert not [r for r in caplog.records if "so the rate jumps" in r.getMessage()]
