"""Logs records to TensorBoard event files, one directory per phase."""

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from typing_extensions import override

from xax.core.metric import LogAudio, LogVideo
from xax.core.state import Phase
from xax.task.loggers.base import Logger, LogRecord

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.summary_pb2 import Summary  # ty: ignore[missing-module-member]


class TensorBoardLogger(Logger):
    """Writes scalars, images, texts, histograms, audio and video to TensorBoard event files.

    Audio is written as WAV and video as an animated GIF in the images dashboard, both encoded
    here (tensorboardX would need soundfile and moviepy for them).

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
