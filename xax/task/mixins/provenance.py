"""Provenance: what decides a run's result, written to ``<run_dir>/provenance.json`` (``xax.task.provenance``)."""

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import jax
import yaml
from typing_extensions import override

from xax.core.errors import ProvenanceError
from xax.data.fingerprint import dataset_fingerprint
from xax.task.base import BaseConfig, BaseTask
from xax.task.provenance import (
    PROVENANCE_NAME,
    read_provenance,
    start_entry,
    step_fingerprint,
    write_provenance,
    xax_origin,
)

if TYPE_CHECKING:
    from xax.task.mixins.artifacts import GitState

logger = logging.getLogger(__name__)

# LibYAML's loader where PyYAML was built with it (a few times faster), else the pure-Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Config = TypeVar("Config", bound=BaseConfig)


class ProvenanceMixin(BaseTask[Config], Generic[Config]):
    """Records the run's provenance on process 0: an entry when the run starts (versions, devices,
    flags, environment allow-list, config, git), completed by the datasets' fingerprints as the
    loop opens them and by the training step's program fingerprint once jit has lowered it. A
    resumed run appends an entry to the previous ones."""

    if TYPE_CHECKING:  # from ArtifactsMixin, composed beside this one (xax/task/task.py)
        run_dir: Path

        def git_state(self) -> GitState | None: ...
        def upload_run_files(self) -> None: ...

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._provenance: list[dict[str, Any]] | None = None  # every start's entry; this start's last

    @override
    def on_run_start(self) -> None:
        super().on_run_start()
        self._provenance = None
        if jax.process_index() != 0:
            return
        # The resolved config as this start saved it (ArtifactsMixin.write_run_metadata, called by LoggerMixin).
        config = yaml.load((self.run_dir / "config.yaml").read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        entry = start_entry(config, self.git_state())
        self._provenance = [*self._previous_starts(), entry]
        self._write_provenance()

    @override
    def on_run_end(self) -> None:
        try:
            super().on_run_end()
        finally:
            self._provenance = None  # complete: datasets opened after the run are not part of it

    def _previous_starts(self) -> list[dict[str, Any]]:
        """The entries of earlier starts in this run directory; an unreadable file is set aside, not lost."""
        path = self.run_dir / PROVENANCE_NAME
        if not path.exists():
            return []
        try:
            return read_provenance(self.run_dir)
        except ProvenanceError:
            aside = path.with_name(f"{PROVENANCE_NAME}.unreadable")
            os.replace(path, aside)
            logger.warning("%s is unreadable; kept it as %s and started a new one", path, aside)
            return []

    def _write_provenance(self) -> None:
        if self._provenance is not None:
            write_provenance(self.run_dir, self._provenance)

    @override
    def on_dataset(self, phase: str, dataset: object) -> None:
        """Records the fingerprint of the dataset a phase reads (the first one it opens in this start)."""
        super().on_dataset(phase, dataset)
        if self._provenance is None or phase in self._provenance[-1]["data"]:
            return
        self._provenance[-1]["data"][phase] = dataset_fingerprint(dataset)
        self._write_provenance()

    def record_train_step(self, step: Any, *args: Any, start_step: int) -> None:
        """Records the fingerprint of the training step's program, lowered for ``args`` (its first call).

        jit caches the lowering by the arguments' types, so the call that follows reuses this one:
        nothing is traced, lowered or compiled a second time.

        Args:
            step: The ``jax.jit``-wrapped training step.
            *args: The arguments of its first call.
            start_step: The step the run starts from (0, or the step of the checkpoint it resumed).
        """
        if self._provenance is None or self._provenance[-1]["step"] is not None:
            return
        entry = self._provenance[-1]
        entry["start_step"] = start_step
        if jax.config.values["jax_disable_jit"]:
            entry["step"] = {"sha256": None, "note": "not compiled (jax_disable_jit)"}
        else:
            entry["step"] = step_fingerprint(step.trace(*args).lower())
        entry["xax"] = xax_origin()  # the modules imported by now, the step's own included
        self._write_provenance()
        self.upload_run_files()
