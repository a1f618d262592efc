"""Named sections of the host loop: timed, and labelled in profiler traces."""

import time
from collections import defaultdict
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import jax

from xax.task.base import BaseConfig, BaseTask


@dataclass
class StepContextConfig(BaseConfig):
    pass


Config = TypeVar("Config", bound=StepContextConfig)


class StepContextMixin(BaseTask[Config], Generic[Config]):
    """Times named sections of the host loop (``with self.step_context("valid"): ...``).

    The times are host wall-clock seconds: with asynchronous dispatch a section that only launches
    device work measures the launch, which is what matters for keeping the device fed.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._section_seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def step_context(self, name: str) -> Generator[None]:
        """Times the enclosed block under ``name`` and labels it in profiler traces."""
        start = time.perf_counter()
        with jax.profiler.TraceAnnotation(f"xax/{name}"):
            try:
                yield
            finally:
                self._section_seconds[name] += time.perf_counter() - start

    def pop_section_times(self) -> dict[str, float]:
        """Seconds spent in each section since the last call, as ``timers/<name>`` metrics."""
        times = {f"timers/{name}_s": seconds for name, seconds in self._section_seconds.items()}
        self._section_seconds.clear()
        return times
