"""Command-line entry for the subprocess tests: ``python -m tests.task.toy_main key=value ...``."""

from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import jax
import numpy as np

import xax
from tests.task.toy import RegressionBase, RegressionConfig, regression_arrays


@dataclass
class FaultyConfig(RegressionConfig):
    fail_after_rows: int | None = xax.field(None, help="Make the training data raise after this many rows")
    poison_row: int | None = xax.field(None, help="Set this training row's features to NaN")


class FaultyRegression(RegressionBase[FaultyConfig]):
    def get_dataset(self, phase: xax.Phase) -> datasets.Dataset | datasets.IterableDataset:
        limit = self.config.fail_after_rows
        if phase == "train" and self.config.poison_row is not None:
            x, y = regression_arrays(self.config.num_train, 0, self.config.num_features)
            x[self.config.poison_row] = np.nan
            return datasets.Dataset.from_dict({"x": x, "y": y})
        if phase == "valid" or limit is None:
            return super().get_dataset(phase)

        def rows() -> Iterator[dict[str, np.ndarray]]:
            for i in range(limit):
                yield {"x": np.full(4, i, np.float32), "y": np.array(i, np.float32)}
            raise RuntimeError(f"the data source broke after {limit} rows")

        return datasets.IterableDataset.from_generator(rows)


if __name__ == "__main__":
    state = FaultyRegression.launch(FaultyConfig(batch_size=32))
    print(f"devices={jax.device_count()} steps={state.num_steps}")
