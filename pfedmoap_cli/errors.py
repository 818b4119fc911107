"""User-facing error types.

Every error a user can fix is a :class:`UserError`: the CLI prints its one-line
message (which names the fix) and exits with code 2, without a traceback.
Anything else is a bug and is reported as an internal error.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user can correct; the message names the fix."""

    exit_code = 2


class DataError(UserError):
    """Missing, corrupt or mismatching dataset files."""


class ArtifactError(UserError):
    """A workspace artifact (partition, checkpoint, run) is missing, malformed or inconsistent."""


class ConfigError(UserError):
    """Invalid settings: bad option values, unknown names, conflicting flags."""


class FederationError(UserError):
    """A round could not finish because clients failed on their nodes; nothing of it was recorded."""

    exit_code = 1
