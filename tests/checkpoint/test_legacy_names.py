"""Checkpoints of DiT and the SSM language model written before their MLP parameters were renamed
(``mlp.fc1``/``fc2`` and ``mlp.w1``/``b1``/``w2``/``b2`` -> ``mlp.up_proj``/``down_proj``; fixtures
written by xax 94fad41 with ``make_legacy_fixture.py``) still restore: by resuming, by
``restore_weights`` and by ``warm_start``; a checkpoint whose names differ in an undeclared way
still fails with the one-line mismatch error."""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from tests.checkpoint.make_legacy_fixture import (
    FIXTURES,
    RECORD,
    TASKS,
    DiTFixtureTask,
    array_sums,
    legacy_argv,
    legacy_config,
    tiny_dit,
    tiny_ssm,
)
from xax.arch import dit, ssm
from xax.arch.dit import DiT
from xax.arch.ssm import SSMLanguageModel
from xax.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointOptions,
    Rename,
    legacy_renames,
    restore_checkpoint,
    restore_weights,
)
from xax.checkpoint.renames import as_renames, plan_renames

LEGACY = {"dit": "legacy_94fad41_dit", "ssm": "legacy_94fad41_ssm"}
TABLES = {"dit": as_renames(dit.LEGACY_PARAM_NAMES), "ssm": as_renames(ssm.LEGACY_PARAM_NAMES)}


def new_name(model: str, name: str) -> str:
    """The current name of a saved array (by the model's declared table)."""
    return next((new for rename in TABLES[model] if (new := rename.apply(name)) is not None), name)


def renamed_sums(model: str, record: dict[str, Any]) -> dict[str, float]:
    return {new_name(model, name): value for name, value in record["array_sums"].items()}


@pytest.fixture(params=sorted(LEGACY))
def legacy(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, dict[str, Any]]:
    """(model, a copy of its fixture, its record): a restore must not write into the repository."""
    source = FIXTURES / LEGACY[request.param]
    copy = tmp_path / "fixture"
    shutil.copytree(source, copy)
    return request.param, copy, json.loads((source / RECORD).read_text())


def test_the_fixtures_hold_the_old_names() -> None:
    for model, old in (
        ("dit", r"params\.blocks\.mlp\.fc[12]\.(weight|bias)"),
        ("ssm", r"params\.blocks\.0\.mlp\.[wb][12]"),
    ):
        record = json.loads((FIXTURES / LEGACY[model] / RECORD).read_text())
        assert record["model"] == model and record["git_commit"].startswith("94fad41")
        assert sum(re.fullmatch(old, name) is not None for name in record["array_sums"]) == 4
        assert not any("up_proj" in name or "down_proj" in name for name in record["array_sums"])
        size = sum(path.stat().st_size for path in (FIXTURES / LEGACY[model]).rglob("*") if path.is_file())
        assert size < 300_000


def test_the_tables_rename_onto_the_current_models() -> None:
    models = {"dit": DiT(tiny_dit(), key=jax.random.key(0)), "ssm": SSMLanguageModel(tiny_ssm(), key=jax.random.key(0))}
    for model, tree in models.items():
        assert set(legacy_renames(tree)) == set(TABLES[model])
        record = json.loads((FIXTURES / LEGACY[model] / RECORD).read_text())
        names = {name.removeprefix("params.") for name in renamed_sums(model, record) if name.startswith("params.")}
        current = {
            jax.tree_util.keystr(path, simple=True, separator=".")
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)
        }
        assert names <= current and any("up_proj" in name for name in names)


@pytest.mark.parametrize("launcher", ["launcher.kind=single_device", "launcher.kind=multi_device"])
def test_resume_reads_the_old_names_under_the_new(
    legacy: tuple[str, Path, dict[str, Any]], tmp_path: Path, launcher: str
) -> None:
    model, path, record = legacy
    step_dir = path / "checkpoints" / str(record["step"])
    restored: list[Any] = []
    tasks: list[Any] = []

    base: Any = TASKS[model]

    class Resumed(base):
        def on_run_start(self) -> None:
            tasks.append(self)
            super().on_run_start()

        def restore_training(self, target: Any) -> Any:
            result = super().restore_training(target)
            restored.append(result)
            return result

    # max_steps is the fixture's step: the run restores and trains no further.
    Resumed.launch(legacy_config(), argv=legacy_argv(tmp_path / "run", f"resume={step_dir}", launcher))
    assert len(restored) == 1 and restored[0] is not None
    tree, info = restored[0]
    assert info.step == record["step"]
    assert info.state.to_dict() == record["state"]
    assert info.cursor.to_dict() == record["cursor"]
    expected = renamed_sums(model, record)
    assert array_sums(tree._asdict()) == expected
    final = tasks[0].final_train_state
    assert final is not None
    assert array_sums(final._asdict()) == expected
    devices = 1 if launcher.endswith("single_device") else len(jax.devices())
    up_proj = final.params.blocks.mlp.up_proj if model == "dit" else final.params.blocks[0].mlp.up_proj
    assert up_proj.weight.sharding.mesh.devices.size == devices


def test_resume_auto_of_a_run_directory_holding_an_old_checkpoint(
    legacy: tuple[str, Path, dict[str, Any]], tmp_path: Path
) -> None:
    model, path, record = legacy
    run_dir = tmp_path / "run"
    shutil.copytree(path / "checkpoints", run_dir / "checkpoints")
    states = []

    base: Any = TASKS[model]

    class Resumed(base):
        def on_run_end(self) -> None:
            states.append(self.final_train_state)
            super().on_run_end()

    Resumed.launch(legacy_config(), argv=legacy_argv(run_dir, "resume=auto"))
    assert array_sums(states[0]._asdict()) == renamed_sums(model, record)


@pytest.mark.parametrize("prefer_ema", [True, False])
def test_restore_weights_reads_the_old_names(legacy: tuple[str, Path, dict[str, Any]], prefer_ema: bool) -> None:
    model, path, record = legacy
    template = (
        DiT(tiny_dit(), key=jax.random.key(1))
        if model == "dit"
        else SSMLanguageModel(tiny_ssm(), key=jax.random.key(1))
    )
    restored = restore_weights(template, path / "checkpoints", record["step"], prefer_ema=prefer_ema)
    prefix = "ema." if prefer_ema else "params."
    expected = {
        name.removeprefix(prefix): value
        for name, value in renamed_sums(model, record).items()
        if name.startswith(prefix)
    }
    assert array_sums(restored) == expected


def test_warm_start_reads_the_old_names(legacy: tuple[str, Path, dict[str, Any]], tmp_path: Path) -> None:
    model, path, record = legacy
    started: list[Any] = []

    base: Any = TASKS[model]

    class WarmStarted(base):
        def warm_start_params(self, params: Any) -> Any:
            result = super().warm_start_params(params)
            started.append(array_sums({"params": result}))  # before the step donates them
            return result

    step_dir = path / "checkpoints" / str(record["step"])
    WarmStarted.launch(legacy_config(), argv=legacy_argv(tmp_path / "run", f"warm_start={step_dir}", "max_steps=1"))
    expected = {name: value for name, value in renamed_sums(model, record).items() if name.startswith("params.")}
    assert started == [expected]


def test_undeclared_differences_still_fail_with_the_one_line_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fixture"
    shutil.copytree(FIXTURES / LEGACY["dit"], path)
    step_dir = path / "checkpoints" / "6"

    class Undeclared(DiTFixtureTask):  # the same names, with no table to read them
        def legacy_param_names(self, tree: Any) -> tuple[Rename, ...]:
            return ()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        Undeclared.launch(legacy_config(), argv=legacy_argv(tmp_path / "run", f"resume={step_dir}"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert f"checkpoint {step_dir.resolve()} does not fit this run's model and optimizer" in err
    assert "mlp.up_proj" in err and "unreadable" not in err

    # A table that renames onto names the target lacks (another model's) is no excuse either.
    target = {"params": {"blocks": {"mlp": {"up_proj": {"weight": jax.numpy.zeros((16, 8))}}}}}
    with pytest.raises(CheckpointMismatchError, match=r"^checkpoint .* does not fit this run's model and optimizer"):
        restore_checkpoint(path / "checkpoints", [6], target, fall_back=False, renames=TABLES["dit"])


def test_a_plan_needs_every_difference_declared() -> None:
    shape = jax.ShapeDtypeStruct((2, 3), jax.numpy.float32)
    wanted = {"a.mlp.up_proj.weight": shape, "a.other": shape}
    renames = TABLES["dit"]
    assert plan_renames(wanted, {"a.mlp.fc1.weight": shape, "a.other": shape}, renames) is not None
    assert plan_renames(wanted, {"a.mlp.fc1.weight": shape, "a.another": shape}, renames) is None
    assert plan_renames(wanted, {"a.mlp.fc1.weight": shape}, renames) is None
    assert (
        plan_renames(
            wanted, {"a.mlp.fc1.weight": jax.ShapeDtypeStruct((3, 2), jax.numpy.float32), "a.other": shape}, renames
        )
        is None
    )
    transposed = (Rename(r"(.*\.)?mlp\.fc1\.weight", r"\1mlp.up_proj.weight", "transpose"),)
    flipped = {"a.mlp.fc1.weight": jax.ShapeDtypeStruct((3, 2), jax.numpy.float32), "a.other": shape}
    plan = plan_renames(wanted, flipped, transposed)
    assert plan is not None and plan.transform["a.mlp.up_proj.weight"] == "transpose"


def test_a_transposing_rename_places_each_array_with_its_target_sharding(tmp_path: Path) -> None:
    devices = jax.devices()
    mesh = jax.sharding.Mesh(devices, ("data",))
    old = {"params": {"w_old": jnp.arange(4 * len(devices), dtype=jnp.float32).reshape(4, -1), "b": jnp.ones(3)}}
    manager = CheckpointManager(tmp_path, CheckpointOptions())
    try:
        manager.save(1, old, {"step": 1}, wait=True)
    finally:
        manager.close()
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    target = {
        "params": {
            "w_new": jax.device_put(jnp.zeros((len(devices), 4)), sharded),
            "b": jax.device_put(jnp.zeros(3), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
        }
    }
    renames = (Rename(r"params\.w_old", "params.w_new", "transpose"),)
    restored = restore_checkpoint(tmp_path, [1], target, fall_back=False, renames=renames).tree
    assert (restored["params"]["w_new"] == old["params"]["w_old"].T).all()
    assert restored["params"]["w_new"].sharding == sharded
    assert (restored["params"]["b"] == 1).all()
    with pytest.raises(CheckpointMismatchError):  # without the table: the one-line mismatch
        restore_checkpoint(tmp_path, [1], target, fall_back=False, renames=())
