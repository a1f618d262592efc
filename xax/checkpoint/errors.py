"""The errors a checkpoint read or write raises, each naming the checkpoint at fault."""

from xax.core.errors import CheckpointError


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint holds other arrays than the restore target (its config or code changed
    since it was saved); not a corrupt one, so resuming does not fall back past it."""


class CorruptCheckpointError(CheckpointError):
    """An array read back from a checkpoint differs from the checksum recorded when it was saved."""
