"""Logs records to Weights & Biases, offline unless asked otherwise, never prompting for a login."""

import importlib
import importlib.util
import io
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from typing_extensions import override

from xax.core.errors import ConfigError
from xax.task.loggers.base import LogEvent, Logger, LogRecord

logger = logging.getLogger(__name__)

WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES: tuple[WandbMode, ...] = ("online", "offline", "disabled")

# Seconds W&B may take to start its service and open the run before it gives up (its default is 90).
INIT_TIMEOUT_S = 60.0

# In the run directory: the W&B run's id and name, so that a resumed run continues the same W&B run.
RUN_FILE = "wandb_run.json"


def _import_wandb() -> ModuleType:
    try:
        return importlib.import_module("wandb")
    except ImportError as e:
        raise ImportError(
            "WandbLogger needs the `wandb` package, which is not installed; install it with "
            "`pip install 'xax[wandb]'` (or `pip install wandb`), or turn the W&B logger off"
        ) from e


def check_wandb(mode: str, key: str = "log.wandb_mode") -> None:
    """Raises ``ConfigError`` unless W&B can start in ``mode`` without asking anything: the package
    is installed and, for an online run, credentials are configured (``WANDB_API_KEY`` or
    ``wandb login``). Nothing is contacted.

    Args:
        mode: "offline", "online" or "disabled".
        key: The option the mode came from, named in the error.
    """
    if mode not in WANDB_MODES:
        raise ConfigError(f"{key}={mode!r} is not one of {list(WANDB_MODES)}")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "W&B logging needs the `wandb` package, which is not installed; install it with "
            "`pip install 'xax[wandb]'` (or `pip install wandb`), or turn the W&B logger off"
        )
    if mode != "online":
        return
    wandb = _import_wandb()
    # Silent, login finds the key without printing or asking the server whose it is (seconds offline).
    wandb.setup(wandb.Settings(silent=True, login_timeout=1.0))
    if not wandb.login(prompt=False, verify=False):
        raise ConfigError(
            f"{key}=online needs W&B credentials: set WANDB_API_KEY or run `wandb login`, "
            f"or set {key}=offline and upload the run later with `wandb sync`"
        )


def default_run_name(run_dir: Path) -> str:
    """A W&B display name no other machine's run shares: the run folder, the host and the start time
    (``run_003-gpu-node-7-20260101-120000``), since numbered run folders repeat across machines."""
    return f"{Path(run_dir).name}-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}"


class WandbLogger(Logger):
    """Writes scalars, images, texts, histograms, audio (WAV) and video (GIF) to a W&B run.

    Keys are namespaced by phase (``train/loss``, ``valid/loss``) and plotted against a logged
    ``step`` metric rather than W&B's own step, since W&B drops values logged at a step below one
    it has seen and the records of two phases can arrive in either order.

    The run is offline by default: it writes under ``run_dir/wandb`` and can be uploaded later
    with ``wandb sync``. An online run needs credentials already configured (``WANDB_API_KEY`` or
    ``wandb login``); without them this raises a one-line ``ConfigError`` instead of prompting. An
    online run that cannot reach the server within ``init_timeout_s`` logs offline, with a warning.
    W&B's console capture, messages, git and code snapshots and system-metric sampling are off.

    The W&B run starts at the first record or event. Its id and name are kept in
    ``run_dir/wandb_run.json``: when the first thing logged is a resume marker (training continued
    from a checkpoint of this run directory), the W&B run of that id continues (``resume="allow"``);
    otherwise a new W&B run starts. Offline, the continuation is a second folder under
    ``run_dir/wandb`` with the same id; ``wandb sync`` uploads both into the one run.

    Args:
        run_dir: The directory W&B writes its files under.
        project: The W&B project.
        name: The run's display name; by default the run folder's name, the host and the start
            time, so that runs of different machines never share one.
        entity: The W&B user or team; the default entity if None.
        mode: "offline", "online" or "disabled".
        config: The run's configuration (a plain dict), shown in the W&B UI.
        tags: Labels to filter runs by in the W&B UI.
        group: Puts the run in this group (several seeds or processes of one experiment).
        notes: A longer description of the run.
        init_timeout_s: How long an online run may take to reach the W&B server; past it, the
            run logs offline instead (with a warning) and can be uploaded later with ``wandb sync``.
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
        tags: Sequence[str] = (),
        group: str | None = None,
        notes: str | None = None,
        init_timeout_s: float = INIT_TIMEOUT_S,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ConfigError(f"W&B mode must be one of {', '.join(WANDB_MODES)}; got {mode!r}")
        self._wandb = wandb = _import_wandb()
        if mode == "online":
            check_wandb(mode, key="mode")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._settings = wandb.Settings(
            silent=True,
            quiet=True,
            show_info=False,
            show_warnings=False,
            console="off",
            disable_git=True,
            disable_code=True,
            save_code=False,
            x_disable_stats=True,
            init_timeout=init_timeout_s,
            # A bound on any login prompt W&B shows despite the check below.
            login_timeout=1.0,
        )
        self._init_args: dict[str, Any] = {
            "project": project,
            "entity": entity,
            "mode": mode,
            "tags": list(tags) or None,
            "group": group,
            "notes": notes,
        }
        self._name = name
        self._config = config
        self._run: Any = None
        # Encoded audio waits here until W&B has copied it into the run.
        self._media = tempfile.TemporaryDirectory(prefix="xax-wandb-media-")
        self._media_dir = Path(self._media.name)
        self._closed = False

    @property
    def run_id(self) -> str | None:
        """The W&B run's id, once it has started."""
        return None if self._run is None else str(self._run.id)

    def _start(self, resume: bool) -> None:
        """Opens the W&B run: the one recorded in the run directory when resuming, else a new one."""
        path = self.run_dir / RUN_FILE
        previous = json.loads(path.read_text(encoding="utf-8")) if resume and path.exists() else None
        name = self._name or (previous["name"] if previous is not None else default_run_name(self.run_dir))
        args = {
            "id": None if previous is None else previous["id"],
            "name": name,
            "resume": None if previous is None else "allow",
            "dir": str(self.run_dir),
            # A continued run may have changed options (more steps): its config is updated below.
            "config": self._config if previous is None else None,
            "settings": self._settings,
            "reinit": "create_new",
            **self._init_args,
        }
        try:
            self._run = self._wandb.init(**args)
        except self._wandb.errors.Error as error:
            if args["mode"] != "online":
                raise
            # Training goes on: what would have been uploaded is kept for `wandb sync`.
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            logger.warning(
                "W&B could not start the online run (%s); logging offline into %s instead, upload it later "
                "with `wandb sync`",
                reason,
                self.run_dir / "wandb",
            )
            self._run = self._wandb.init(**{**args, "mode": "offline"})
        if previous is None:
            tmp_path = path.with_name(f".{RUN_FILE}.tmp")
            tmp_path.write_text(json.dumps({"id": self._run.id, "name": name}) + "\n", encoding="utf-8")
            os.replace(tmp_path, path)
        elif self._config is not None:
            self._run.config.update(self._config, allow_val_change=True)
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    @override
    def write_event(self, event: LogEvent) -> None:
        if self._run is None:
            self._start(resume=event.kind == "resume")

    @override
    def write(self, record: LogRecord) -> None:
        if self._run is None:
            self._start(resume=False)
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
            # The GIF carries its frame rate; W&B warns at each video given one as well.
            data[prefix + key] = wandb.Video(io.BytesIO(video.gif_bytes()), format="gif")
        self._run.log(data)

    @override
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._run is not None:
                self._run.finish()
            self._media.cleanup()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
