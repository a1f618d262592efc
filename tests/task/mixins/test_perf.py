"""FLOPs, MFU, memory and profiler traces of the training step, against exact matmul counts."""

import itertools
from collections.abc import Callable
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src import monitoring
from jaxtyping import Array, PRNGKeyArray

import xax
from tests.task.toy import read_jsonl
from xax.task.mixins.perf import peak_flops_per_device
from xax.utils.flops import matmul_flops, step_flops, xla_flops

# Matmul-only chain x (M, K0) @ W1 (K0, K1) @ W2 (K1, K2) @ W3 (K2, K3).
M, WIDTHS = 64, (96, 128, 112, 80)


def chain_formula(batch: int, widths: tuple[int, ...], input_grad: bool) -> int:
    """Forward ``2 m k n`` per matmul, backward twice that (the weight's and the input's gradient),
    less the first input's gradient when nothing asks for it."""
    products = [2 * batch * a * b for a, b in itertools.pairwise(widths)]
    return 3 * sum(products) - (0 if input_grad else products[0])


def non_matmul_bound(batch: int, widths: tuple[int, ...]) -> int:
    """An upper bound on the elementwise and reduction FLOPs of a step: a handful (at most 8) per
    weight, activation and input element (loss sum, SGD update, gradient norm, casts), which stays
    under 1% of the matmuls at these widths."""
    params = sum(a * b for a, b in itertools.pairwise(widths))
    activations = batch * sum(widths)
    return 8 * (params + activations)


def chain_loss(weights: list[Array], x: Array) -> Array:
    h = x
    for w in weights:
        h = h @ w
    # Not a plain sum: XLA folds a matmul by its constant all-ones cotangent into a reduction.
    return 0.5 * jnp.sum(h * h)


def random_weights(widths: tuple[int, ...]) -> list[Array]:
    keys = jax.random.split(jax.random.key(0), len(widths) - 1)
    return [0.01 * jax.random.normal(k, (a, b)) for k, a, b in zip(keys, widths[:-1], widths[1:], strict=True)]


@pytest.mark.parametrize("input_grad", [False, True])
def test_step_flops_match_the_matmul_formula(input_grad: bool) -> None:
    def sgd_step(weights: list[Array], x: Array) -> tuple[list[Array], Array]:
        argnums = (0, 1) if input_grad else 0
        grads = jax.grad(chain_loss, argnums=argnums)(weights, x)
        if input_grad:
            grads, x_grad = grads
            x = x - 0.1 * x_grad
        return [w - 0.1 * g for w, g in zip(weights, grads, strict=True)], x

    x = jnp.ones((M, WIDTHS[0]))
    flops = step_flops(jax.jit(sgd_step).trace(random_weights(WIDTHS), x))
    exact = chain_formula(M, WIDTHS, input_grad)
    assert flops is not None
    assert exact <= flops <= exact + non_matmul_bound(M, WIDTHS)


def test_scanned_layers_count_every_iteration() -> None:
    depth, width = 6, 64

    def scanned(w: Array, x: Array) -> Array:
        return jnp.sum(jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0])

    def looped(w: Array, x: Array) -> Array:
        h = x
        for i in range(depth):
            h = jnp.tanh(h @ w[i])
        return jnp.sum(h)

    w, x = jnp.ones((depth, width, width)), jnp.ones((M, width))
    # XLA's own count sees the scan body once: the correction is what makes the two agree.
    traced_scan = jax.jit(jax.grad(scanned)).trace(w, x)
    raw = xla_flops(traced_scan.lower().cost_analysis())
    assert raw is not None and raw < 2 * 3 * 2 * M * width * width
    # The scan's backward also computes the first layer's input gradient, which the loop drops.
    executed, _ = matmul_flops(traced_scan.jaxpr.jaxpr)
    assert executed == depth * 3 * 2 * M * width * width
    by_scan = step_flops(traced_scan)
    by_loop = step_flops(jax.jit(jax.grad(looped)).trace(w, x))
    assert by_scan is not None and by_loop is not None
    first_input_grad = 2 * M * width * width
    # Beyond the matmuls the two programs differ only in elementwise work (the loop's slicing of w).
    assert abs((by_scan - first_input_grad) - by_loop) <= 8 * (depth * width * width + depth * M * width)


def test_unrolled_scan_is_counted_once_per_iteration() -> None:
    w, x = jnp.ones((7, 32, 32)), jnp.ones((8, 32))

    def f(w: Array, x: Array) -> Array:
        return jnp.sum(jax.lax.scan(lambda h, wi: (h @ wi, None), x, w, unroll=3)[0])

    executed, counted = matmul_flops(jax.jit(f).trace(w, x).jaxpr.jaxpr)
    # 7 = 2 trips of 3 unrolled copies (counted once) + 1 remainder.
    assert (executed, counted) == (7 * 2 * 8 * 32 * 32, 4 * 2 * 8 * 32 * 32)


def test_peak_table_and_unknown_device() -> None:
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", jnp.dtype(jnp.bfloat16)) == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe", jnp.dtype(jnp.bfloat16)) == 756e12
    assert peak_flops_per_device("NVIDIA H200", jnp.dtype(jnp.float32)) == 495e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB", jnp.dtype(jnp.float16)) == 312e12
    assert peak_flops_per_device("cpu", jnp.dtype(jnp.float32)) is None


# ---- through the training loop -------------------------------------------------------------


class ChainConfig(xax.Config):
    pass


class Chain(xax.Task[xax.Config]):
    """The matmul chain as a task: SGD on the weights, the loss ``|x W1 W2 W3|^2 / (2 M)``."""

    def get_model(self, params: xax.InitParams) -> list[Array]:
        return random_weights(WIDTHS)

    def get_optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(1e-3)

    def compute_loss_and_metrics(
        self, model: list[Array], batch: dict[str, Array], state: xax.State, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, xax.Metric]]:
        return chain_loss(model, batch["x"]) / M, {}

    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset:
        x = np.random.default_rng(0).normal(size=(4 * M, WIDTHS[0])).astype(np.float32)
        return datasets.Dataset.from_dict({"x": x}).with_format("numpy")

    def batch_columns(self) -> tuple[str, ...]:
        return ("x",)


def launch_chain(run_dir: Path, *overrides: str) -> xax.State:
    argv = [
        f"artifacts.run_dir={run_dir}",
        "launcher.kind=single_device",
        "log.stdout=false",
        "log.tensorboard=false",
        "compile.cache=false",
        "valid_every_n_steps=null",
        "log.every_n_seconds=null",
        f"batch_size={M}",
        *overrides,
    ]
    return Chain.launch(xax.Config(), argv=argv)


def test_loop_logs_flops_throughput_and_mfu(tmp_path: Path) -> None:
    launch_chain(tmp_path, "max_steps=6", "log.every_n_steps=3", "perf.peak_tflops=0.5")
    records = [r["scalars"] for r in read_jsonl(tmp_path / "log.jsonl") if r["phase"] == "train"]
    assert len(records) == 2
    exact = chain_formula(M, WIDTHS, input_grad=False)
    for scalars in records:
        assert exact <= scalars["flops_per_step"] <= exact + non_matmul_bound(M, WIDTHS)
        tflops = scalars["flops_per_step"] * scalars["steps_per_second"] / 1e12
        assert scalars["tflops_per_second"] == pytest.approx(tflops, rel=1e-9)
        assert scalars["mfu"] == pytest.approx(tflops / 0.5, rel=1e-9)
        # CPU devices report no memory statistics: the metric is absent, not zero.
        assert "peak_memory_gb" not in scalars


def _count_compiles(run: Callable[[], object]) -> int:
    compiles: list[float] = []

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event.endswith("backend_compile_duration"):
            compiles.append(duration_secs)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        run()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    return len(compiles)


def test_analysis_compiles_nothing_extra(tmp_path: Path) -> None:
    with_analysis = _count_compiles(lambda: launch_chain(tmp_path / "a", "max_steps=2"))
    without = _count_compiles(lambda: launch_chain(tmp_path / "b", "max_steps=2", "perf.flops=false"))
    assert with_analysis == without


def test_profile_trace_of_the_chosen_steps(tmp_path: Path) -> None:
    state = launch_chain(tmp_path, "max_steps=8", "perf.profile_steps=[3,5]")
    assert state.num_steps == 8  # the loop went on after the trace
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_bad_profile_range_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        launch_chain(tmp_path, "max_steps=2", "perf.profile_steps=[5,3]")
    assert exit_info.value.code == 2
    assert "perf.profile_steps=[5, 3]" in capsys.readouterr().err


def test_without_a_backend_analysis_the_matmuls_are_counted() -> None:
    def sgd_step(weights: list[Array], x: Array) -> list[Array]:
        grads = jax.grad(chain_loss, argnums=(0, 1))(weights, x)[0]
        return [w - 0.1 * g for w, g in zip(weights, grads, strict=True)]

    traced = jax.jit(sgd_step).trace(random_weights(WIDTHS), jnp.ones((M, WIDTHS[0])))

    class NoAnalysis:
        """A traced step whose backend gives no cost analysis of the unoptimized program."""

        jaxpr = traced.jaxpr

        def lower(self) -> "NoAnalysis":
            return self

        def cost_analysis(self) -> None:
            return None

    # The input gradient is computed but unused, so it is dropped before counting.
    assert step_flops(NoAnalysis()) == chain_formula(M, WIDTHS, False)
