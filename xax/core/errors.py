"""Errors a user can act on: each names the key or file at fault and the fix."""


class XaxError(Exception):
    """Base class for errors caused by the user's configuration or data, not by a bug."""


class ConfigError(XaxError):
    """The configuration is invalid: an unknown key, a wrong type, a missing value."""


class DataError(XaxError):
    """A dataset does not have the shape the task needs: a missing or ragged column."""


class LaunchError(XaxError):
    """The launcher cannot run the task as configured (device count, batch size)."""


class CheckpointError(XaxError):
    """A checkpoint cannot be read or written: missing, truncated, corrupt, or of another shape."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, no permission); the older ones are intact."""


class TrainingStopped(XaxError):  # noqa: N818 (a request, not a failure)
    """Training stopped on a signal after saving; carries the process exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class HubError(XaxError):
    """A Hugging Face hub name cannot be resolved: no network, offline and not cached, or no such repository."""


class ProvenanceError(XaxError):
    """A run's provenance cannot be read: no such run directory, or no readable provenance.json in it."""
