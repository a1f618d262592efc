"""Logs records to TensorBoard event files, one directory per phase."""

import importlib
import json
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import yaml
from typing_extensions import override

from xax.core.metric import LogAudio, LogVideo
from xax.core.state import Phase
from xax.task.loggers.base import LogEvent, Logger, LogRecord
from xax.task.loggers.sections import CONSTANT_NAMES, dashboard_tag

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.summary_pb2 import Summary  # ty: ignore[missing-module-member]


def import_in_background(module: str) -> threading.Thread | None:
    """Starts importing ``module`` in a daemon thread; None when it is imported already.

    tensorboardX imports torch when it is installed (2 s on a CPU, more with CUDA), and an import
    holds the interpreter lock most of the time: done by the logging thread at the first record, it
    slowed the training loop's first logging windows to half speed on an H100. Started with the
    run, it overlaps the model's initialization and compilation instead. A failure is left to the
    import where the module is used, which raises it there.
    """
    if module in sys.modules:
        return None

    def run() -> None:
        try:
            importlib.import_module(module)
        except Exception:  # raised again, with its message, where the module is used
            return

    thread = threading.Thread(target=run, name=f"xax-import-{module}", daemon=True)
    thread.start()
    return thread


class TensorBoardLogger(Logger):
    """Writes scalars, images, texts, histograms, audio and video to TensorBoard event files.

    Audio is written as WAV and video as an animated GIF in the images dashboard, both encoded
    here (tensorboardX would need soundfile and moviepy for them).

    Each phase gets its own writer in ``log_dir/<phase>``, so TensorBoard draws the training and
    validation curves of one metric in the same chart. Writers are made when their phase first
    logs.

    The task's scalars keep their names; the framework's are grouped under ``perf/`` (throughput,
    timers, FLOPs) and ``system/`` (CPU, GPU, memory, epoch) by ``dashboard_tag``, and those fixed
    for the run (``flops_per_step``) are written only when they change. Texts are shown as written,
    line breaks and all, never read as Markdown. The config, when given, is written once into
    ``log_dir`` itself as the text ``config`` (YAML) and as the run's hyperparameters (the HPARAMS
    dashboard, its nested keys joined by dots), at the step the run started from (0, or the step of
    the resume marker).

    Args:
        log_dir: The directory holding one subdirectory per phase.
        config: The run's configuration (a plain nested dict), or None to write none.
    """

    wants_heavy: ClassVar[bool] = True

    def __init__(self, log_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self._config = None if config is None else dict(config)
        self._writers: dict[Phase | None, SummaryWriter] = {}
        self._constants: dict[tuple[Phase, str], float] = {}
        import_in_background("tensorboardX")

    def _writer(self, phase: Phase | None) -> "SummaryWriter":
        """The writer of a phase, or of ``log_dir`` itself (the run's config) for None."""
        if phase not in self._writers:
            # Imported here (started in the background by __init__): tensorboardX imports torch when
            # it is installed, seconds of start-up.
            from tensorboardX import SummaryWriter

            self._writers[phase] = SummaryWriter(logdir=str(self.log_dir if phase is None else self.log_dir / phase))
        return self._writers[phase]

    def _write_config(self, step: int) -> None:
        """Writes the config (text and hyperparameters), once, at the step the run started from."""
        if self._config is None or None in self._writers:
            return
        from tensorboardX.summary import hparams

        writer = self._writer(None)
        writer.add_text("config", preformatted(yaml.safe_dump(self._config, sort_keys=False)), global_step=step)
        _, session_start, _ = hparams(_hparam_values(self._config), {})
        writer._get_file_writer().add_summary(session_start, global_step=step)

    @override
    def write_event(self, event: LogEvent) -> None:
        self._write_config(int(event.step))

    @override
    def write(self, record: LogRecord) -> None:
        step = int(record.step)
        self._write_config(0)  # a resumed run's config went at its resume marker's step
        writer = self._writer(record.phase)
        for key, value in record.scalars.items():
            if key in CONSTANT_NAMES:
                if self._constants.get((record.phase, key)) == value:
                    continue
                self._constants[record.phase, key] = value
            writer.add_scalar(dashboard_tag(key), float(value), global_step=step)
        for key, image in record.images.items():
            writer.add_image(key, image.pixels, global_step=step, dataformats="HWC")
        for key, text in record.texts.items():
            writer.add_text(key, preformatted(text), global_step=step)
        for key, values in record.histograms.items():
            # Binning fails on NaN and infinity; an empty histogram has nothing to show.
            finite = values[np.isfinite(values)]
            if finite.size:
                writer.add_histogram(key, finite, global_step=step)
        media = [_audio_value(key, audio) for key, audio in record.audio.items()]
        media += [_video_value(key, video) for key, video in record.videos.items()]
        if media:
            from tensorboardX.proto.summary_pb2 import Summary  # ty: ignore[missing-module-member]

            writer._get_file_writer().add_summary(Summary(value=media), global_step=step)

    @override
    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    @override
    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def preformatted(text: str) -> str:
    """``text`` as a Markdown code block (each line indented by four spaces), which TensorBoard
    shows as written: line breaks, runs of spaces, ``*`` and ``#`` kept, ``<`` escaped."""
    return "\n".join("    " + line for line in text.split("\n"))


def _hparam_values(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The config's leaves by dotted key, as values the HPARAMS dashboard shows (lists and None as JSON)."""
    values: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            values.update(_hparam_values(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            values[name] = value
        else:
            values[name] = json.dumps(value, default=str)
    return values


def _audio_value(tag: str, audio: LogAudio) -> "Summary.Value":
    from tensorboardX.proto.summary_pb2 import Summary  # ty: ignore[missing-module-member]

    length, channels = audio.samples.shape
    encoded = Summary.Audio(
        sample_rate=audio.sample_rate,
        num_channels=channels,
        length_frames=length,
        encoded_audio_string=audio.wav_bytes(),
        content_type="audio/wav",
    )
    return Summary.Value(tag=tag, audio=encoded)


def _video_value(tag: str, video: LogVideo) -> "Summary.Value":
    from tensorboardX.proto.summary_pb2 import Summary  # ty: ignore[missing-module-member]

    _, height, width, channels = video.frames.shape
    encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=video.gif_bytes())
    return Summary.Value(tag=tag, image=encoded)
