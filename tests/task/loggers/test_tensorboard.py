"""Tests for the TensorBoard logger, reading the event files back."""

import io
import struct
import warnings
import wave
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # ty: ignore[missing-module-member]
from tensorboardX.proto.event_pb2 import Event  # ty: ignore[missing-module-member]

from tests.task.toy import Regression, RegressionConfig
from xax.core.metric import LogAudio, LogImage, LogVideo
from xax.task.loggers.base import LogEvent, LogRecord
from xax.task.loggers.tensorboard import TensorBoardLogger

with warnings.catch_warnings():
    # TensorBoard's vendored HTML sanitizer warns of its own deprecation on import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from tensorboard.plugins.text.text_plugin import text_array_to_html


def read_events(directory: Path) -> list[Event]:
    """Reads every event of the event files in a directory (TFRecord framing)."""
    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            # uint64 length, uint32 length CRC, payload, uint32 payload CRC.
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            assert len(payload) == length, f"truncated record in {path}"
            events.append(Event.FromString(payload))
            offset += 12 + length + 4
    return events


def html(text: bytes) -> str:
    """What TensorBoard's text dashboard shows for a logged text."""
    return text_array_to_html(np.array(text), True)


def accumulate(directory: Path) -> EventAccumulator:
    """TensorBoard's own reader over one run's event files, loaded."""
    accumulator = EventAccumulator(str(directory), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def text_of(accumulator: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """A text tag's (step, HTML) entries as the text dashboard shows them."""
    return [(event.step, html(event.tensor_proto.string_val[0])) for event in accumulator.Tensors(tag)]


def tag_values(events: list[Event]) -> dict[str, list[tuple[int, Any]]]:
    """Summary values by tag, with their steps."""
    found: dict[str, list[tuple[int, Any]]] = {}
    for event in events:
        for value in event.summary.value:
            found.setdefault(value.tag, []).append((event.step, value))
    return found


def test_writes_each_phase_to_its_own_directory(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path / "tb")
    image = np.zeros((6, 10, 3), dtype=np.uint8)
    image[:, :5] = 255
    logger.write(
        LogRecord(
            step=3,
            num_samples=96,
            elapsed_time_s=1.0,
            phase="train",
            scalars={"loss": 0.5},
            images={"samples": LogImage(image)},
            texts={"generated": "to be or not"},
            histograms={"weights": np.array([0.0, 1.0, 2.0, np.nan], dtype=np.float32)},
        )
    )
    logger.write(LogRecord(step=7, num_samples=224, elapsed_time_s=2.0, phase="train", scalars={"loss": 0.25}))
    logger.write(LogRecord(step=7, num_samples=224, elapsed_time_s=2.5, phase="valid", scalars={"loss": 0.75}))
    logger.close()

    train = tag_values(read_events(tmp_path / "tb" / "train"))
    assert [(step, value.simple_value) for step, value in train["loss"]] == [(3, 0.5), (7, 0.25)]
    ((step, img),) = train["samples"]
    assert step == 3
    assert (img.image.height, img.image.width) == (6, 10)
    text_tags = [tag for tag in train if tag.startswith("generated")]
    assert len(text_tags) == 1
    ((step, text),) = train[text_tags[0]]
    assert step == 3
    assert html(text.tensor.string_val[0]) == "<pre><code>to be or not\n</code></pre>"
    ((step, hist),) = train["weights"]
    assert step == 3
    # The NaN is dropped before binning.
    assert hist.histo.num == 3
    assert (hist.histo.min, hist.histo.max) == (0.0, 2.0)

    valid = tag_values(read_events(tmp_path / "tb" / "valid"))
    assert [(step, value.simple_value) for step, value in valid["loss"]] == [(7, 0.75)]
    assert set(valid) == {"loss"}


def test_audio_and_video_are_encoded_without_extra_packages(tmp_path: Path) -> None:
    samples = np.linspace(-1.0, 1.0, 50, dtype=np.float32).reshape(25, 2)
    frames = np.zeros((2, 3, 4, 3), np.uint8)
    frames[1] = 255
    logger = TensorBoardLogger(tmp_path / "tb")
    record = LogRecord(
        step=5,
        num_samples=0,
        elapsed_time_s=0.0,
        phase="valid",
        audio={"speech": LogAudio(samples, 16000)},
        videos={"rollout": LogVideo(frames, fps=5.0)},
    )
    logger.write(record)
    logger.close()
    found = tag_values(read_events(tmp_path / "tb" / "valid"))
    ((step, sound),) = found["speech"]
    assert step == 5
    assert (sound.audio.sample_rate, sound.audio.num_channels, sound.audio.length_frames) == (16000, 2, 25)
    assert sound.audio.content_type == "audio/wav"
    with wave.open(io.BytesIO(sound.audio.encoded_audio_string)) as wav:
        pcm = np.frombuffer(wav.readframes(25), "<i2").reshape(25, 2)
    np.testing.assert_array_equal(pcm, np.round(samples * 32767).astype(np.int16))
    ((step, clip),) = found["rollout"]
    assert (step, clip.image.height, clip.image.width, clip.image.colorspace) == (5, 3, 4, 3)
    gif = PILImage.open(io.BytesIO(clip.image.encoded_image_string))
    decoded = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    np.testing.assert_array_equal(np.stack(decoded), frames)


def test_text_is_shown_as_written(tmp_path: Path) -> None:
    sample = "def f(x):\n    return x * 2\n\n# not a heading\n* not a list <b>"
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.write(LogRecord(step=2, num_samples=0, elapsed_time_s=0.0, phase="valid", texts={"sample": sample}))
    logger.close()
    ((step, shown),) = text_of(accumulate(tmp_path / "tb" / "valid"), "sample/text_summary")
    expected = sample.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert (step, shown) == (2, f"<pre><code>{expected}\n</code></pre>")


def test_framework_scalars_are_grouped_and_constants_written_once(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path / "tb", config={"lr": 0.1, "model": {"depth": 2, "act": None}})
    # A resumed run: its config is written at the step it continued from.
    logger.write_event(LogEvent(step=4, kind="resume"))
    for step, flops in ((5, 1e9), (6, 1e9), (7, 2e9)):
        scalars = {"loss": 1.0 / step, "steps_per_second": 3.0, "cpu/process_percent": 50.0, "flops_per_step": flops}
        logger.write(LogRecord(step=step, num_samples=0, elapsed_time_s=0.0, phase="train", scalars=scalars))
    logger.close()

    train = accumulate(tmp_path / "tb" / "train")
    assert sorted(train.Tags()["scalars"]) == [
        "loss",
        "perf/flops_per_step",
        "perf/steps_per_second",
        "system/cpu/process_percent",
    ]
    assert [event.step for event in train.Scalars("loss")] == [5, 6, 7]
    assert [(event.step, event.value) for event in train.Scalars("perf/flops_per_step")] == [(5, 1e9), (7, 2e9)]

    root = accumulate(tmp_path / "tb")
    ((step, shown),) = text_of(root, "config/text_summary")
    assert (step, shown) == (4, "<pre><code>lr: 0.1\nmodel:\n  depth: 2\n  act: null\n</code></pre>")
    (content,) = root.PluginTagToContent("hparams").values()
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert (hparams["lr"].number_value, hparams["model.depth"].number_value) == (0.1, 2.0)
    assert hparams["model.act"].string_value == "null"


def test_a_run_writes_its_config_and_groups_its_scalars(tmp_path: Path) -> None:
    argv = [f"artifacts.run_dir={tmp_path}", "log.stdout=false", "log.every_n_steps=2", "max_steps=4"]
    Regression.launch(RegressionConfig(batch_size=32), argv=argv)
    train = accumulate(tmp_path / "tensorboard" / "train")
    tags = train.Tags()["scalars"]
    # The task's metrics at the top level; the framework's under perf/ and system/ only.
    assert {tag for tag in tags if "/" not in tag} == {"loss", "grad_norm", "abs_error"}
    assert {tag.split("/")[0] for tag in tags if "/" in tag} == {"perf", "system"}
    assert {"perf/steps_per_second", "perf/samples_per_second", "system/epoch"} <= set(tags)
    assert [event.step for event in train.Scalars("loss")] == [2, 4]
    assert [event.step for event in train.Scalars("perf/flops_per_step")] == [2]
    root = accumulate(tmp_path / "tensorboard")
    ((step, shown),) = text_of(root, "config/text_summary")
    assert step == 0 and "\nbatch_size: 32\n" in shown
    (content,) = root.PluginTagToContent("hparams").values()
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    assert (hparams["batch_size"].number_value, hparams["max_steps"].number_value) == (32.0, 4.0)
    assert hparams["log.tensorboard"].bool_value is True
