"""What the top-level options hand to every subcommand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pfedmoap_cli.engine.workspace import Workspace
from pfedmoap_cli.errors import StorageError


@dataclass(frozen=True)
class CliContext:
    workspace: Path
    data_root: Path
    progress: bool

    @property
    def ws(self) -> Workspace:
        """The workspace; a ``--workspace`` naming an existing file is refused here, before any work.

        Every command that reads or writes the workspace goes through this
        property, so the check is made once for all of them. A workspace that
        does not exist yet is fine: it is created by the first write.
        """
        root = Path(self.workspace)
        if root.exists() and not root.is_dir():
            raise StorageError(f"--workspace {root} is a file, not a folder; pass a folder", root)
        return Workspace(root)
