"""``xax plan MODULE:CLASS`` and ``parallel.report=true``: the pre-flight report of a task's plan."""

import logging
import re
from pathlib import Path

import pytest

from xax.cli import main
from xax.testing.plan_parity import TinyLM, TinyLMConfig

TASK = "xax.testing.plan_parity:TinyLM"


def test_plan_prints_memory_per_device_and_the_layout(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", TASK, "batch_size=8", "parallel.plan=fsdp", "launcher.kind=multi_device", "--no-compile"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Plan fsdp on mesh data=1 x fsdp=4 x tensor=1" in out
    # Every weight of the tiny model divides by 4 along its width, so each device holds a quarter.
    found = re.search(r"params\s+([\d.]+) KiB ->\s+([\d.]+) KiB", out)
    assert found is not None, out
    whole, per_device = found.groups()
    assert float(per_device) == pytest.approx(float(whole) / 4, rel=0.05)
    assert re.search(r"layers\.self_attn\.q_proj\.weight\s+\(2, 64, 64\)\s+float32\s+P\(None, None, 'fsdp'\)", out)


def test_plan_compiles_the_step_for_xla_memory_and_flops(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", TASK, "batch_size=8", "parallel.plan=tp", "launcher.kind=multi_device"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Compiled step, per device (XLA memory analysis)" in out
    found = re.search(r"FLOPs per step\s+([\d.]+) GFLOP", out)
    assert found is not None and float(found.group(1)) > 0, out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "no_such_module:Task"], "task 'no_such_module:Task': cannot import no_such_module"),
        (["plan", "xax.testing.plan_parity"], "is not MODULE:CLASS"),
        (
            ["plan", TASK, "parallel.plan=dp+tp", "parallel.tensor=3", "launcher.kind=multi_device"],
            "mesh data=-1 x fsdp=1 x tensor=3 needs a multiple of 3 devices but 4 are available",
        ),
        (
            ["plan", TASK, "batch_size=6", "parallel.plan=fsdp", "launcher.kind=multi_device", "--no-compile"],
            "batch_size=6 is not divisible by grad_accum_steps x data x fsdp = 1 x 1 x 4",
        ),
    ],
)
def test_plan_mistakes_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_report_flag_logs_the_report_before_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="xax.task.mixins.train"):
        TinyLM.launch(
            TinyLMConfig(batch_size=8, max_steps=1),
            argv=[
                "launcher.kind=single_device",
                "parallel.report=true",
                "parallel.sharded_init=false",
                f"artifacts.run_dir={tmp_path}",
                "log.stdout=false",
                "log.tensorboard=false",
                "compile.cache=false",
            ],
        )
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "Plan dp on mesh data=1 x fsdp=1 x tensor=1" in text
    assert "FLOPs per step" in text
