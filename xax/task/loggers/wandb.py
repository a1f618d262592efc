"""Logs records to Weights & Biases, offline unless asked otherwise, never prompting for a login."""

import importlib
import io
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from typing_extensions import override

from xax.core.errors import ConfigError
from xax.task.loggers.base import Logger, LogRecord

WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES: tuple[WandbMode, ...] = ("online", "offline", "disabled")

# Seconds W&B may take to start its service and open the run before it gives up (its default is 90).
_INIT_TIMEOUT_S = 60.0


def _import_wandb() -> ModuleType:
    try:
        return importlib.import_module("wandb")
    except ImportError as e:
        raise ImportError(
            "WandbLogger needs the `wandb` package, which is not installed; install it with "
            "`pip install 'xax[wandb]'` (or `pip install wandb`), or turn the W&B logger off"
        ) from e


class WandbLogger(Logger):
    """Writes scalars, images, texts, histograms, audio (WAV) and video (GIF) to a W&B run.

    Keys are namespaced by phase (``train/loss``, ``valid/loss``) and plotted against a logged
    ``step`` metric rather than W&B's own step, since W&B drops values logged at a step below one
    it has seen and the records of two phases can arrive in either order.

    The run is offline by default: it writes under ``run_dir/wandb`` and can be uploaded later
    with ``wandb sync``. An online run needs credentials already configured (``WANDB_API_KEY`` or
    ``wandb login``); without them this raises instead of prompting. W&B's console capture,
    messages, git and code snapshots and system-metric sampling are off.

    Args:
        run_dir: The directory W&B writes its files under.
        project: The W&B project.
        name: The run's display name; W&B picks one if None.
        entity: The W&B user or team; the default entity if None.
        mode: "offline", "online" or "disabled".
        config: The run's configuration (a plain dict), shown in the W&B UI.
    """

    wants_heavy: ClassVar[bool] = True

    def __init__(
        self,
        run_dir: Path,
        project: str,
        name: str | None = None,
        entity: str | None = None,
        mode: str = "offline",
        config: dict[str, Any] | None = None,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ConfigError(f"W&B mode must be one of {', '.join(WANDB_MODES)}; got {mode!r}")
        self._wandb = wandb = _import_wandb()
        settings = wandb.Settings(
            silent=True,
            quiet=True,
            show_info=False,
            show_warnings=False,
            console="off",
            disable_git=True,
            disable_code=True,
            save_code=False,
            x_disable_stats=True,
            init_timeout=_INIT_TIMEOUT_S,
            # A bound on any login prompt W&B shows despite the check below.
            login_timeout=1.0,
        )
        if mode == "online" and not wandb.login(prompt=False, verify=False):
            raise ConfigError(
                "W&B mode 'online' needs credentials: set WANDB_API_KEY or run `wandb login`, "
                "or log offline (mode 'offline') and upload later with `wandb sync`"
            )
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=project,
            name=name,
            entity=entity,
            dir=str(self.run_dir),
            mode=mode,
            config=config,
            settings=settings,
            reinit="create_new",
        )
        # Encoded audio waits here until W&B has copied it into the run.
        self._media = tempfile.TemporaryDirectory(prefix="xax-wandb-media-")
        self._media_dir = Path(self._media.name)
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        self._closed = False

    @override
    def write(self, record: LogRecord) -> None:
        wandb = self._wandb
        prefix = f"{record.phase}/"
        data: dict[str, Any] = {"step": int(record.step), f"{prefix}num_samples": int(record.num_samples)}
        data.update({prefix + key: float(value) for key, value in record.scalars.items()})
        for key, image in record.images.items():
            data[prefix + key] = wandb.Image(image.pixels)
        for key, text in record.texts.items():
            # HTML media keeps one text per step, browsable with the step slider.
            data[prefix + key] = wandb.Html(f"<pre>{_escape(text)}</pre>", inject=False)
        for key, values in record.histograms.items():
            # Binning fails on NaN and infinity; an empty histogram has nothing to show.
            finite = values[np.isfinite(values)]
            if finite.size:
                data[prefix + key] = wandb.Histogram(finite)
        for key, audio in record.audio.items():
            # W&B encodes raw samples with soundfile; a WAV file needs nothing more.
            path = self._media_dir / f"{record.phase}_{key.replace('/', '_')}_{record.step}.wav"
            path.write_bytes(audio.wav_bytes())
            data[prefix + key] = wandb.Audio(str(path))
        for key, video in record.videos.items():
            data[prefix + key] = wandb.Video(io.BytesIO(video.gif_bytes()), fps=round(video.fps), format="gif")
        self._run.log(data)

    @override
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._run.finish()
            self._media.cleanup()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
