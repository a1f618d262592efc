"""Command-line entry for the watchdog tests: ``python -m tests.task.mixins.watchdog_main key=value ...``.

The regression task with streamed data that can block forever or arrive slowly.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import jax
import numpy as np

import xax
from tests.task.toy import RegressionBase, RegressionConfig, regression_arrays


@dataclass
class StallingConfig(RegressionConfig):
    block_after_rows: int | None = xax.field(None, help="The training data blocks forever after this many rows")
    seconds_per_batch: float = xax.field(0.0, help="Seconds the training and validation data take per batch")
    blocking_process: int | None = xax.field(None, help="Only this process's data blocks (default: every process's)")


def block_forever() -> None:
    """Stands for a data source that never answers (a stuck network read)."""
    threading.Event().wait()


class StallingRegression(RegressionBase[StallingConfig]):
    def get_dataset(self, phase: xax.Phase) -> datasets.IterableDataset:
        config = self.config
        num, seed = (config.num_train, 0) if phase == "train" else (config.num_valid, 1)
        x, y = regression_arrays(num, seed)
        blocks = phase == "train" and config.blocking_process in (None, jax.process_index())
        limit = config.block_after_rows if blocks else None
        batch_size, seconds = config.batch_size, config.seconds_per_batch

        def rows() -> Iterator[dict[str, np.ndarray]]:
            for i in range(num):
                if i == limit:
                    block_forever()
                if seconds and i % batch_size == 0:
                    time.sleep(seconds)
                yield {"x": x[i], "y": y[i]}

        return datasets.IterableDataset.from_generator(rows)


if __name__ == "__main__":
    state = StallingRegression.launch(StallingConfig(batch_size=8))
    print(f"steps={state.num_steps}")
