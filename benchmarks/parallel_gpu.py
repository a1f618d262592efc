"""Parallel plans on 2 GPUs: parity with one GPU, data-parallel scaling, and memory per device.

(a) Parity: ``xax.testing.plan_parity`` trains a tiny float32 transformer through the Task loop on
    1 GPU (dp) and on 2 GPUs under dp, fsdp and tp; every step's loss and gradient norm and the
    validation loss must agree at 1e-4 relative.
(b) Scaling: GPT-2 small (``benchmarks.gpt2_throughput``'s task: seq 1024, bf16 compute, AdamW,
    cuDNN attention), 16 windows per GPU, plan dp, on 1 GPU and on 2; tokens per second from the
    JSONL log, and their ratio (target at least 1.9x).
(c) Memory: the same GPT-2 run on 2 GPUs under dp and under fsdp: the peak bytes each device
    reports (``device.memory_stats()``) and XLA's memory analysis of the compiled step.

Every run is a process of its own, so no allocator holds memory the next one needs.

    python -m benchmarks.parallel_gpu --out benchmarks/results
    python -m benchmarks.parallel_gpu --tiny    # a CPU check of the script on 2 simulated devices; no numbers
"""

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from benchmarks.common import run_child_processes, steps_per_second_after, write_results
from xax import human_bytes

CHILDREN = ("parity", "dp1", "dp2", "dp2_overlap", "fsdp2")
# dp2_overlap: dp on 2 GPUs with XLA's latency-hiding scheduler, which may overlap the gradient
# all-reduce with the backward pass.
CHILD_XLA_FLAGS = {"dp2_overlap": "--xla_gpu_enable_latency_hiding_scheduler=true"}
GPT2_CHILDREN = {"dp1": (1, "dp"), "dp2": (2, "dp"), "dp2_overlap": (2, "dp"), "fsdp2": (2, "fsdp")}
PARITY_RTOL = 1e-4
SCALING_TARGET = 1.9


def run_parity_child(args: argparse.Namespace) -> dict[str, Any]:
    from xax.testing import PlanCase, run_parity

    cases = [PlanCase(2, "dp"), PlanCase(2, "fsdp"), PlanCase(2, "tp")]
    with tempfile.TemporaryDirectory() as work:
        _, differences = run_parity(PlanCase(1, "dp"), cases, Path(work), steps=5, rtol=PARITY_RTOL)
    return {"differences": differences}


def run_gpt2_child(args: argparse.Namespace, num_devices: int, plan: str) -> dict[str, Any]:
    """Trains GPT-2 through the Task loop; returns tokens/s, per-device peak bytes and XLA's analysis."""
    from benchmarks.gpt2_throughput import Config, GPT2Throughput, make_setup, xax_argv

    setup = make_setup(args.tiny, "auto" if args.tiny else "cudnn")
    finished: list[GPT2Throughput] = []

    class Recorded(GPT2Throughput):
        def on_run_end(self) -> None:
            super().on_run_end()
            finished.append(self)

    batch = setup.batch * num_devices
    with tempfile.TemporaryDirectory() as run_dir:
        argv = [
            *xax_argv(run_dir, args.steps, args.warmup),
            "launcher.kind=multi_device",
            f"launcher.num_devices={num_devices}",
            f"parallel.plan={plan}",
            "log.tensorboard=false",
        ]
        Recorded.launch(Config(batch_size=batch, tiny=args.tiny, attention="auto" if args.tiny else "cudnn"), argv=argv)
        steps_per_s = steps_per_second_after(Path(run_dir), args.warmup)
    task = finished[0]
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in task.get_mesh().devices.flat]
    # The layout alone (no second compile): XLA's analysis of the step the run compiled is on the task.
    report = task.plan_report(compile_step=False)
    memory = task.step_memory
    temp = None if memory is None else memory.temp_size_in_bytes
    peak = None
    if memory is not None:
        peak = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + temp
    return {
        "tokens_per_s": steps_per_s * batch * setup.model.max_seq_len,
        "peak_bytes": peaks,
        "state_bytes_per_device": {name: per_device for name, (_, per_device) in report.groups.items()},
        "xla_peak_bytes": peak,
        "xla_temp_bytes": temp,
        "flops_per_step": task.flops_per_step,
    }


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    if args.tiny:  # two simulated CPU devices stand in for the GPUs
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", 2)
    if args.child == "parity":
        return run_parity_child(args)
    num_devices, plan = GPT2_CHILDREN[args.child]
    return run_gpt2_child(args, num_devices, plan)


def run_children(args: argparse.Namespace) -> dict[str, dict[str, Any] | None]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), *(["--tiny"] if args.tiny else [])]

    def xla_flags(child: str) -> str:
        return "" if args.tiny else CHILD_XLA_FLAGS.get(child, "")

    return run_child_processes("benchmarks.parallel_gpu", CHILDREN, flags, extra_xla_flags=xla_flags)


def _bytes(value: float | None) -> str:
    return "n/a" if value is None else human_bytes(value, 2)


def rows_of(results: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(measure: str, setting: str, value: str, target: str, ok: bool | None) -> None:
        met = "" if ok is None else ("yes" if ok else "NO")
        rows.append({"measure": measure, "setting": setting, "value": value, "target": target, "met": met})

    parity = results["parity"]
    if parity is None:
        row("parity", "1 vs 2 GPUs", "failed", f"<= {PARITY_RTOL:g} rel", False)
    else:
        for label, values in parity["differences"].items():
            worst = max(values.values())
            row("parity (max rel diff)", label, f"{worst:.2e}", f"<= {PARITY_RTOL:g}", worst <= PARITY_RTOL)
    for name, (num_devices, plan) in GPT2_CHILDREN.items():
        result = results.get(name)
        value = "failed" if result is None else f"{result['tokens_per_s']:,.0f} tokens/s"
        setting = f"{plan}, {num_devices} GPU(s){', overlap' if name in CHILD_XLA_FLAGS else ''}"
        row("GPT-2 throughput", setting, value, "", None if result else False)
    one = results["dp1"]
    for name in ("dp2", "dp2_overlap"):
        two = results.get(name)
        if one is not None and two is not None:
            ratio = two["tokens_per_s"] / one["tokens_per_s"]
            setting = f"2 GPUs / 1 GPU{', overlap' if name in CHILD_XLA_FLAGS else ''}"
            row("dp scaling", setting, f"{ratio:.3f}x", f">= {SCALING_TARGET}x", ratio >= SCALING_TARGET)
    for name, plan in (("dp2", "dp"), ("fsdp2", "fsdp")):
        result = results[name]
        if result is None:
            row("memory", f"{plan}, 2 GPUs", "failed", "", False)
            continue
        peaks = [p for p in result["peak_bytes"] if p is not None]
        state = result["state_bytes_per_device"]
        row("memory: device peak", f"{plan}, 2 GPUs", _bytes(max(peaks) if peaks else None), "", None)
        row("memory: XLA step peak", f"{plan}, 2 GPUs", _bytes(result["xla_peak_bytes"]), "", None)
        row("memory: params+opt", f"{plan}, 2 GPUs", _bytes(state["params"] + state["opt_state"]), "", None)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Parallel plans on 2 GPUs: parity, scaling and memory")
    parser.add_argument("--steps", type=int, default=None, help="Last timed step (default 60; 6 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 20; 2 with --tiny)")
    parser.add_argument("--out", type=Path, default=None, help="Results folder (default benchmarks/results)")
    parser.add_argument("--tiny", action="store_true", help="Tiny model on 2 simulated CPU devices: a script check")
    parser.add_argument("--child", choices=CHILDREN, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (6 if args.tiny else 60)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 20)
    if args.child is not None:
        args.result_file.write_text(json.dumps(run_child(args)))
        return
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="xax_bench_tiny_")) if args.tiny else Path("benchmarks/results")
    results = run_children(args)
    notes = (
        f"{'2 simulated CPU devices' if args.tiny else '2 GPUs'}. (a) plan_parity's tiny float32 transformer, "
        "5 steps, 1 GPU dp against 2 GPUs under each plan. "
        f"(b) GPT-2 small (bf16 compute, AdamW, cuDNN attention), 16 x 1024 tokens per GPU, steps "
        f"{args.warmup}..{args.steps} timed through the Task loop. (c) peak bytes in use per device after that "
        "run, and XLA's memory analysis (arguments + outputs - aliased + temporaries) of its compiled step."
    )
    stem = write_results(args.out, "parallel_gpu", rows_of(results), notes, tiny=args.tiny)
    # The raw measurements (per-device peaks, FLOPs, every parity difference) next to the table.
    (args.out / f"{stem}_raw.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
