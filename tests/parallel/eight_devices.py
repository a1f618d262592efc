"""Runs on 8 simulated CPU devices, in a process of its own (the test process has 4):
``python -m tests.parallel.eight_devices parity OUT.json`` or
``python -m tests.parallel.eight_devices checkpoint SAVED_RUN RESTORE_RUN SAVE_RUN OUT.npz``."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FSDP_ARGS = ["launcher.kind=multi_device", "launcher.num_devices=8", "parallel.plan=fsdp"]


def start(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs this module with ``args`` in a fresh process (no inherited JAX or XLA settings)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    command = [sys.executable, "-m", "tests.parallel.eight_devices", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def parity(out: Path) -> None:
    from xax.testing.plan_parity import PlanCase, run_parity

    case = PlanCase(8, "dp+fsdp+tp", ("parallel.fsdp=2", "parallel.tensor=2"))
    with tempfile.TemporaryDirectory() as work:
        base, differences = run_parity(PlanCase(1, "dp"), [case], Path(work), steps=3, rtol=1.0)
    out.write_text(json.dumps({"reference": base.to_dict(), "differences": differences}))


def checkpoint(saved: Path, restore_dir: Path, save_dir: Path, out: Path) -> None:
    from xax.testing.plan_parity import TinyLM, TinyLMConfig

    common = ["log.stdout=false", "log.tensorboard=false", "compile.cache=false", "valid_every_n_steps=null"]
    restored: list[TinyLM] = []

    class Restoring(TinyLM):
        def on_run_end(self) -> None:
            super().on_run_end()
            restored.append(self)

    # max_steps is the saved step: the run restores and stops without training.
    Restoring.launch(
        TinyLMConfig(batch_size=8, max_steps=2),
        argv=[*FSDP_ARGS, f"artifacts.run_dir={restore_dir}", f"resume={saved}", *common],
    )
    ts = restored[0].final_train_state
    assert ts is not None
    from xax.utils.pytree import path_name

    leaves = jax.tree_util.tree_leaves_with_path(ts.params)
    arrays = {path_name(path): np.asarray(leaf) for path, leaf in leaves}
    specs = {path_name(path): str(leaf.sharding.spec) for path, leaf in leaves}
    np.savez(out, allow_pickle=False, **arrays)
    out.with_suffix(".json").write_text(json.dumps(specs))
    TinyLM.launch(TinyLMConfig(batch_size=8, max_steps=2), argv=[*FSDP_ARGS, f"artifacts.run_dir={save_dir}", *common])


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    mode, *paths = sys.argv[1:]
    if mode == "parity":
        parity(Path(paths[0]))
    else:
        checkpoint(*(Path(p) for p in paths))
