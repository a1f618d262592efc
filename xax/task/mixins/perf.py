"""Performance of the training loop: FLOPs per step, TFLOP/s and MFU, peak memory, profiler traces."""

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import jax
import jax.numpy as jnp
from typing_extensions import override

from xax.core.config import field
from xax.core.errors import ConfigError
from xax.task.base import BaseConfig, BaseTask
from xax.utils.flops import step_flops

logger = logging.getLogger(__name__)

_BYTES_PER_GB = 1e9

# Dense peak TFLOP/s of one device, by a lower-case piece of its ``device_kind``, most specific
# first: (bfloat16/float16, float32). NVIDIA's float32 column is the TF32 tensor-core rate, which
# JAX's default matmul precision uses on Ampere and later; TPUs run float32 matmuls as bfloat16
# passes by default, hence the same number. From the vendors' data sheets (sparsity excluded).
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756.0, 378.0),
    ("h100 nvl", 835.0, 418.0),
    ("h200 nvl", 835.0, 418.0),
    ("gh200", 989.0, 495.0),
    ("h100", 989.0, 495.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989.0, 495.0),
    ("b200", 2250.0, 1100.0),
    ("a100", 312.0, 156.0),
    ("l40s", 362.0, 183.0),
    ("l4", 121.0, 60.0),
    ("tpu v4", 275.0, 275.0),
    ("tpu v5 lite", 197.0, 197.0),
    ("tpu v5", 459.0, 459.0),
    ("tpu v6 lite", 918.0, 918.0),
)


def peak_flops_per_device(device_kind: str, dtype: jnp.dtype) -> float | None:
    """A device's dense peak FLOP/s for matmuls in ``dtype``, or None for a device not in the table.

    Args:
        device_kind: ``jax.Device.device_kind``, such as "NVIDIA H100 80GB HBM3".
        dtype: The compute dtype: 16-bit floats use the first column of ``PEAK_TFLOPS``, others the second.

    Returns:
        FLOP/s (not TFLOP/s).
    """
    kind = device_kind.lower()
    for pattern, half, single in PEAK_TFLOPS:
        if pattern in kind:
            return 1e12 * (half if jnp.dtype(dtype).itemsize == 2 else single)
    return None


def peak_memory_bytes(devices: list[jax.Device]) -> int | None:
    """The largest ``peak_bytes_in_use`` over the devices, or None where no device reports it (CPU)."""
    peaks = []
    for device in devices:
        stats = device.memory_stats() if device.process_index == jax.process_index() else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


@dataclass
class PerfOptions:
    flops: bool = field(
        True,
        help="Count the training step's FLOPs (XLA's cost analysis, once, before the first step) and log "
        "flops_per_step, tflops_per_second and mfu",
    )
    peak_tflops: float | None = field(
        None,
        help="Dense peak TFLOP/s of one device for mfu; None looks the device up by name (H100, H200, A100, B200, "
        "L4, L40S, TPU v4-v6), for the compute dtype",
    )
    profile_steps: list[int] | None = field(
        None, help="Write a jax.profiler trace of training steps [first, last] (e.g. [10, 15]) into <run_dir>/profile"
    )


@dataclass
class PerfConfig(BaseConfig):
    perf: PerfOptions = field(PerfOptions(), help="Performance measurement: FLOPs, MFU, memory, profiler traces")


Config = TypeVar("Config", bound=PerfConfig)

_NEVER = math.inf


def _profile_steps_error(options: PerfOptions) -> str | None:
    """Why ``perf.profile_steps`` is not a usable [first, last] range, or None when it is (or unset)."""
    steps = options.profile_steps
    if steps is None or (len(steps) == 2 and 2 <= steps[0] <= steps[1]):
        return None
    return (
        f"perf.profile_steps={list(steps)} must be [first, last] with 2 <= first <= last (step 1 is "
        "mostly compilation), e.g. perf.profile_steps=[10,15]"
    )


class PerfMixin(BaseTask[Config], Generic[Config]):
    """Measures the training step: the loop calls ``analyze_train_step`` before its first step,
    ``perf_after_step`` after each, and adds ``perf_metrics`` to each light log.

    ``mfu`` divides the FLOPs XLA counts in the step (rematerialized recomputation included, so
    with remat on it is the hardware rather than the model FLOP utilization) by the peak of the
    devices the step runs on.
    """

    if TYPE_CHECKING:  # from ArtifactsMixin, composed beside this one (xax/task/task.py)
        run_dir: Path

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        steps = config.perf.profile_steps
        # An unusable range is refused by validate_config, before the run starts.
        profile = None if steps is None or _profile_steps_error(config.perf) else (int(steps[0]), int(steps[1]))
        self._profile_first, self._profile_last = profile or (0, 0)
        # The step after which the trace starts or stops next.
        self._profile_event: float = _NEVER if profile is None else self._profile_first - 1
        self._profiling = False
        self.flops_per_step: float | None = None
        self.step_memory: Any = None  # the compiled step's memory analysis (XLA's CompiledMemoryStats)
        self._peak_flops: float | None = None  # all of the step's devices together
        self._step_devices: list[jax.Device] = []
        self._analyzed = False

    @override
    def validate_config(self) -> None:
        super().validate_config()
        options = self.config.perf
        if options.peak_tflops is not None and options.peak_tflops <= 0:
            raise ConfigError(f"perf.peak_tflops={options.peak_tflops} must be positive (or null to look it up)")
        if (error := _profile_steps_error(options)) is not None:
            raise ConfigError(error)

    def analyze_train_step(self, step: Any, *args: Any, dtype: jnp.dtype) -> None:
        """Compiles the jitted training step for ``args`` ahead of its first call and reads its FLOPs
        and memory from XLA's analyses.

        The compiled program is the one the first call then runs: JAX keeps it in its in-memory
        compilation cache, keyed by the same lowering, so nothing is compiled twice.

        Args:
            step: The ``jax.jit``-wrapped training step.
            *args: The arguments of its first call.
            dtype: The compute dtype, which picks the peak FLOP/s column.
        """
        if self._analyzed or not self.config.perf.flops or jax.config.values["jax_disable_jit"]:
            return
        self._analyzed = True
        traced = step.trace(*args)
        compiled = traced.lower().compile()
        self.flops_per_step = step_flops(traced)
        self.step_memory = compiled.memory_analysis()
        shardings = [s for s in jax.tree.leaves(compiled.input_shardings) if isinstance(s, jax.sharding.Sharding)]
        devices = {device for sharding in shardings for device in sharding.device_set}
        self._step_devices = sorted(devices, key=lambda d: d.id) or jax.local_devices()[:1]
        override_tflops = self.config.perf.peak_tflops
        per_device = (
            1e12 * override_tflops
            if override_tflops is not None
            else peak_flops_per_device(self._step_devices[0].device_kind, dtype)
        )
        self._peak_flops = None if per_device is None else per_device * len(self._step_devices)
        self._log_analysis()

    def _log_analysis(self) -> None:
        memory = self.step_memory
        parts = [] if self.flops_per_step is None else [f"{self.flops_per_step / 1e9:.3f} GFLOP"]
        if memory is not None:
            parts.append(f"arguments {memory.argument_size_in_bytes / _BYTES_PER_GB:.3f} GB")
            parts.append(f"temporaries {memory.temp_size_in_bytes / _BYTES_PER_GB:.3f} GB")
        if self._peak_flops is None and self._step_devices[0].platform != "cpu":
            parts.append(f"no peak FLOP/s known for {self._step_devices[0].device_kind!r} (set perf.peak_tflops)")
        logger.info("training step: %s", ", ".join(parts))

    def perf_after_step(self, step: int, loss: jax.Array) -> None:
        """Called after step ``step`` (counted from 1) is dispatched; starts and stops the profiler trace.

        Args:
            step: The step just dispatched.
            loss: Its loss, waited on only where a trace starts or stops.
        """
        if step >= self._profile_event:
            self._profile_transition(step, loss)

    def _profile_transition(self, step: int, loss: jax.Array) -> None:
        first, last = self._profile_first, self._profile_last
        loss.block_until_ready()  # so the trace holds exactly the steps asked for
        if not self._profiling and step < last:
            directory = self.run_dir / "profile"
            jax.profiler.start_trace(str(directory))
            self._profiling = True
            self._profile_event = last
            logger.info("Profiling steps %d to %d into %s", max(first, step + 1), last, directory)
        else:
            self._stop_profile()

    def _stop_profile(self) -> None:
        self._profile_event = _NEVER
        if self._profiling:
            self._profiling = False
            jax.profiler.stop_trace()
            logger.info("Profiler trace written to %s", self.run_dir / "profile")

    def perf_metrics(self, steps_per_second: float) -> dict[str, float]:
        """The light log's performance metrics at the window's step rate.

        Args:
            steps_per_second: Training steps per second over the logging window.

        Returns:
            ``flops_per_step`` and ``tflops_per_second`` where the FLOPs are known, ``mfu`` where
            the devices' peak is known too, and ``peak_memory_gb`` (the largest over the step's
            devices, since the start) where the devices report it.
        """
        rate = steps_per_second
        metrics: dict[str, float] = {}
        if self.flops_per_step is not None:
            metrics["flops_per_step"] = self.flops_per_step
            metrics["tflops_per_second"] = self.flops_per_step * rate / 1e12
            if self._peak_flops is not None:
                metrics["mfu"] = self.flops_per_step * rate / self._peak_flops
        peak = peak_memory_bytes(self._step_devices or jax.local_devices())
        if peak is not None:
            metrics["peak_memory_gb"] = peak / _BYTES_PER_GB
        return metrics

    @override
    def on_run_end(self) -> None:
        try:
            self._stop_profile()
        finally:
            super().on_run_end()
