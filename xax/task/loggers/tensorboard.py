"""Logs records to TensorBoard event files, one directory per phase."""

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from typing_extensions import override

from xax.core.state import Phase
from xax.task.loggers.base import Logger, LogRecord

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter


class TensorBoardLogger(Logger):
    """Writes scalars, images, texts and histograms to TensorBoard event files.

    Each phase gets its own writer in ``log_dir/<phase>``, so TensorBoard draws the training and
    validation curves of one metric in the same chart. Writers are made when their phase first
    logs.

    Args:
        log_dir: The directory holding one subdirectory per phase.
    """

    wants_heavy: ClassVar[bool] = True

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writers: dict[Phase, SummaryWriter] = {}

    def _writer(self, phase: Phase) -> "SummaryWriter":
        if phase not in self._writers:
            # Imported here: tensorboardX imports torch when it is installed, seconds of start-up.
            from tensorboardX import SummaryWriter

            self._writers[phase] = SummaryWriter(logdir=str(self.log_dir / phase))
        return self._writers[phase]

    @override
    def write(self, record: LogRecord) -> None:
        writer = self._writer(record.phase)
        step = int(record.step)
        for key, value in record.scalars.items():
            writer.add_scalar(key, float(value), global_step=step)
        for key, image in record.images.items():
            writer.add_image(key, image.pixels, global_step=step, dataformats="HWC")
        for key, text in record.texts.items():
            writer.add_text(key, text, global_step=step)
        for key, values in record.histograms.items():
            # Binning fails on NaN and infinity; an empty histogram has nothing to show.
            finite = values[np.isfinite(values)]
            if finite.size:
                writer.add_histogram(key, finite, global_step=step)

    @override
    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    @override
    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
