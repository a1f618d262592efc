"""Checkpoints on orbax, usable without a Task: asynchronous, atomic, checksummed, restorable
under any mesh, never pickled.

- ``manager``: ``CheckpointManager`` (writes, retention by ``keep_last`` / ``keep_best``, one-line
  write failures), ``CheckpointOptions``, ``checkpoint_steps``.
- ``restore``: ``load_checkpoint``, ``restore_latest`` and ``restore_checkpoint`` (onto any mesh,
  falling back past unreadable checkpoints), ``load_arrays_anywhere``, ``resolve_checkpoint``.
- ``metadata``: ``checkpoint_metadata``, ``read_metadata``, ``config_drift``.
- ``checksums``: ``array_checksums``, ``verify_checksums``, ``read_checksums``.
- ``weights``: ``restore_weights`` (a model for sampling), ``warm_start_weights``.
- ``tree``: ``named_leaves``, ``abstract_like``, shape comparisons.
- ``renames``: ``Rename``, ``legacy_renames``: reading checkpoints of before a parameter rename that
  a model declares (``LEGACY_PARAM_NAMES``).
"""

from xax.checkpoint.checksums import CHECKSUM_ALGORITHM as CHECKSUM_ALGORITHM
from xax.checkpoint.checksums import array_checksums as array_checksums
from xax.checkpoint.checksums import read_checksums as read_checksums
from xax.checkpoint.checksums import verify_checksums as verify_checksums
from xax.checkpoint.errors import CheckpointMismatchError as CheckpointMismatchError
from xax.checkpoint.errors import CorruptCheckpointError as CorruptCheckpointError
from xax.checkpoint.manager import BEST_MODES as BEST_MODES
from xax.checkpoint.manager import CheckpointManager as CheckpointManager
from xax.checkpoint.manager import CheckpointOptions as CheckpointOptions
from xax.checkpoint.manager import check_options as check_options
from xax.checkpoint.manager import checkpoint_steps as checkpoint_steps
from xax.checkpoint.manager import disk_size as disk_size
from xax.checkpoint.metadata import CHECKPOINT_FORMAT as CHECKPOINT_FORMAT
from xax.checkpoint.metadata import checkpoint_metadata as checkpoint_metadata
from xax.checkpoint.metadata import config_drift as config_drift
from xax.checkpoint.metadata import flatten_dict as flatten_dict
from xax.checkpoint.metadata import read_metadata as read_metadata
from xax.checkpoint.quiet import ClosedLoopFilter as ClosedLoopFilter
from xax.checkpoint.quiet import one_line as one_line
from xax.checkpoint.quiet import quiet_orbax as quiet_orbax
from xax.checkpoint.renames import Rename as Rename
from xax.checkpoint.renames import legacy_renames as legacy_renames
from xax.checkpoint.restore import CORRUPT_DIR as CORRUPT_DIR
from xax.checkpoint.restore import RestoredCheckpoint as RestoredCheckpoint
from xax.checkpoint.restore import load_arrays_anywhere as load_arrays_anywhere
from xax.checkpoint.restore import load_checkpoint as load_checkpoint
from xax.checkpoint.restore import resolve_checkpoint as resolve_checkpoint
from xax.checkpoint.restore import restore_checkpoint as restore_checkpoint
from xax.checkpoint.restore import restore_latest as restore_latest
from xax.checkpoint.restore import saved_array_metadata as saved_array_metadata
from xax.checkpoint.tree import abstract_like as abstract_like
from xax.checkpoint.tree import check_shapes as check_shapes
from xax.checkpoint.tree import named_leaves as named_leaves
from xax.checkpoint.tree import tree_differences as tree_differences
from xax.checkpoint.weights import restore_weights as restore_weights
from xax.checkpoint.weights import warm_start_weights as warm_start_weights
from xax.core.errors import CheckpointError as CheckpointError
from xax.core.errors import CheckpointWriteError as CheckpointWriteError
