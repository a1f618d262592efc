import logging
from collections.abc import Iterator

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
