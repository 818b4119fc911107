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


class StorageError(UserError):
    """The workspace's storage refused a read or write: disk full, read-only, a file where a folder
    belongs, no permission. Nothing half-written is left behind; the message names the path and the fix.

    ``path`` is the file that could not be written (when known) and ``errno`` the
    operating system's error number.
    """

    #: The closing advice of messages after which the command can simply be repeated;
    #: a command that continues differently (``train``: ``--resume``) swaps it for its own.
    RERUN = "run the same command again"

    def __init__(self, message: str, path: object = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno

    def with_rerun(self, advice: str) -> "StorageError":
        """The same error with :attr:`RERUN` in its message replaced by ``advice``."""
        changed = StorageError(str(self).replace(self.RERUN, advice), self.path, self.errno)
        changed.__cause__ = self.__cause__
        return changed
