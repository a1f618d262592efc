"""The TensorBoard logger starts importing tensorboardX when it is made, off the training loop: an
import at the first record (tensorboardX imports torch when installed) slowed the first logging
windows to half speed on a GPU."""

import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, threading
from pathlib import Path
from xax.task.loggers.tensorboard import TensorBoardLogger, import_in_background
assert "tensorboardX" not in sys.modules
logger = TensorBoardLogger(Path(sys.argv[1]))
(thread,) = [t for t in threading.enumerate() if t.name == "xax-import-tensorboardX"]
assert thread.daemon
thread.join(120)
assert "tensorboardX" in sys.modules  # imported before anything was written
assert logger._writers == {}
assert import_in_background("tensorboardX") is None  # nothing to do the second time
print("ok")
"""


def test_logger_imports_tensorboardx_in_the_background(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_a_failed_background_import_is_left_to_the_use() -> None:
    from xax.task.loggers.tensorboard import import_in_background

    thread = import_in_background("xax_no_such_module_anywhere")
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive() and "xax_no_such_module_anywhere" not in sys.modules
