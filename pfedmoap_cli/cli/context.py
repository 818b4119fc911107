"""What the top-level options hand to every subcommand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pfedmoap_cli.engine.workspace import Workspace


@dataclass(frozen=True)
class CliContext:
    workspace: Path
    data_root: Path
    progress: bool

    @property
    def ws(self) -> Workspace:
        return Workspace(self.workspace)
