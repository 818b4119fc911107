"""Where every artifact lives inside a workspace directory (ARCHITECTURE.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """Paths of a workspace; creating the object touches nothing on disk."""

    root: Path

    @property
    def partitions_dir(self) -> Path:
        return self.root / "partitions"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def features_cache_dir(self) -> Path:
        return self.root / "cache" / "features"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def locks_dir(self) -> Path:
        """Per-run lock files (see :mod:`pfedmoap_cli.artifacts.run_lock`)."""
        return self.root / "locks"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id


@dataclass(frozen=True)
class RunPaths:
    """Files of one run."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def progress_json(self) -> Path:
        return self.root / "progress.json"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def evaluation_csv(self) -> Path:
        return self.root / "evaluation.csv"

    @property
    def clients_on_nodes(self) -> Path:
        """Present when the run's client states live on Flower SuperNodes, not in this folder."""
        return self.root / "clients-on-nodes.json"

    def round_dir(self, round_index: int) -> Path:
        return self.root / "checkpoints" / f"round-{round_index:04d}"

    def global_checkpoint(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "global.safetensors"

    def client_checkpoint(self, round_index: int, client_id: int) -> Path:
        return self.round_dir(round_index) / f"client-{client_id:04d}.safetensors"
