"""Errors a user can act on: each names the key or file at fault and the fix."""


class XaxError(Exception):
    """Base class for errors caused by the user's configuration or data, not by a bug."""


class ConfigError(XaxError):
    """The configuration is invalid: an unknown key, a wrong type, a missing value."""


class DataError(XaxError):
    """A dataset does not have the shape the task needs: a missing or ragged column."""


class LaunchError(XaxError):
    """The launcher cannot run the task as configured (device count, batch size)."""
