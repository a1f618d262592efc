"""The record every logger receives and the interface every logger implements."""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import jax
import numpy as np

from xax.core.metric import LogAudio, LogHistogram, LogImage, LogScalar, LogText, LogVideo, Metric
from xax.core.state import Phase


@dataclass(frozen=True)
class LogRecord:
    """Host values for one logging event of one phase.

    Attributes:
        step: The optimizer step the values belong to.
        num_samples: Training samples consumed so far.
        elapsed_time_s: Seconds of training so far.
        phase: The namespace of the values: "train" or "valid".
        scalars: Scalar values by name.
        images: Images by name.
        texts: Texts by name.
        histograms: Flattened histogram values by name.
        audio: Sounds by name.
        videos: Clips by name.
        system: The names of the scalars the framework measured on the host (throughput, timers,
            CPU and GPU statistics, FLOPs, memory), as opposed to the task's own metrics.
    """

    step: int
    num_samples: int
    elapsed_time_s: float
    phase: Phase
    scalars: dict[str, float] = field(default_factory=dict)
    images: dict[str, LogImage] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    audio: dict[str, LogAudio] = field(default_factory=dict)
    videos: dict[str, LogVideo] = field(default_factory=dict)
    system: frozenset[str] = frozenset()

    @classmethod
    def from_metrics(
        cls,
        metrics: Mapping[str, Metric],
        *,
        step: int,
        num_samples: int,
        elapsed_time_s: float,
        phase: Phase,
        scalars: Mapping[str, float] | None = None,
        system: Mapping[str, float] | None = None,
    ) -> "LogRecord":
        """Fetches metrics from the device in one transfer and sorts their host values by kind.

        Args:
            metrics: Metrics by name, as returned by a jitted step.
            step: The optimizer step the metrics belong to.
            num_samples: Training samples consumed so far.
            elapsed_time_s: Seconds of training so far.
            phase: "train" or "valid".
            scalars: Scalars that are host values already, added before the metrics' own.
            system: Host measurements of the framework (throughput, timers, CPU and GPU statistics),
                added after them and named in ``system``.

        Returns:
            The record to pass to every logger.
        """
        record = cls(
            step=int(step),
            num_samples=int(num_samples),
            elapsed_time_s=float(elapsed_time_s),
            phase=phase,
            scalars={**(scalars or {}), **(system or {})},
            system=frozenset(system or {}),
        )
        for name, metric in jax.device_get(dict(metrics)).items():
            match metric.to_log():
                case LogScalar(value=value):
                    record.scalars[name] = value
                case LogImage() as image:
                    record.images[name] = image
                case LogText(text=text):
                    record.texts[name] = text
                case LogHistogram(values=values):
                    record.histograms[name] = values
                case LogAudio() as audio:
                    record.audio[name] = audio
                case LogVideo() as video:
                    record.videos[name] = video
        return record


@dataclass(frozen=True)
class LogEvent:
    """A point in the run's history that is not a measurement.

    Attributes:
        step: The step training continues from.
        kind: "resume" (restored from a checkpoint at the start of a run) or "rewind" (restored from
            an earlier checkpoint mid-run, past a non-finite step).
        detail: Short strings describing it (the checkpoint path, the reason).
    """

    step: int
    kind: str
    detail: dict[str, str] = field(default_factory=dict)


class Logger(ABC):
    """Writes log records somewhere: a terminal, a file, a dashboard.

    Attributes:
        wants_heavy: Whether the logger writes images, histograms, audio or video. The caller can skip the
            (slow) evaluation that makes them when no logger wants them.
    """

    wants_heavy: ClassVar[bool] = False

    @abstractmethod
    def write(self, record: LogRecord) -> None:
        """Writes one record."""

    def write_event(self, event: LogEvent) -> None:  # noqa: B027 (optional: most loggers show only metrics)
        """Writes a resume or rewind marker; records after it replace those of its step and later."""

    def flush(self) -> None:  # noqa: B027 (optional: loggers without a buffer keep this no-op)
        """Pushes buffered records to their destination."""

    def close(self) -> None:
        """Flushes and releases the logger's resources; the logger is not used afterwards."""
        self.flush()
