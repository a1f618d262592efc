import logging
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


class _ToCaplog(logging.Handler):
    """Hands xax's records to pytest's log capture while a run has taken the ``xax`` logger off the
    root logger (``LogSetup``), so ``caplog`` sees a run's messages as it sees any others."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger("xax").propagate and record.levelno >= self.target.level:
            self.target.handle(record)


@pytest.fixture(autouse=True)
def _caplog_sees_runs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    forward = _ToCaplog(caplog.handler)
    logging.getLogger("xax").addHandler(forward)
    try:
        yield
    finally:
        logging.getLogger("xax").removeHandler(forward)


@pytest.fixture
def outside_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory git will not search above, so it is in no repository (runs made there
    have the same git state)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(work)
    return work
