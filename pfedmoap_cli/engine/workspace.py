"""Where every artifact lives inside a workspace directory (ARCHITECTURE.md section 1)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pfedmoap_cli.errors import ConfigError

#: A run id is a plain folder name: it becomes ``runs/<id>`` and ``locks/<id>.lock``,
#: so a separator or ``..`` would put files outside the workspace (or in a
#: sub-folder ``report`` never looks in).
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def run_id_problem(run_id: str) -> str | None:
    """Why ``run_id`` is not a usable run name, or ``None`` when it is."""
    if not isinstance(run_id, str) or RUN_ID_PATTERN.fullmatch(run_id) is None:
        return "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
    if ".." in run_id:
        return "'..' is not allowed in a run name"
    return None


def check_run_id(run_id: str, flag: str = "--run-id") -> str:
    """Return ``run_id`` when it is a plain name; raise :class:`ConfigError` naming ``flag`` otherwise."""
    problem = run_id_problem(run_id)
    if problem is not None:
        raise ConfigError(f"{flag} {run_id!r} is not a plain run name: {problem}")
    return run_id


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
        """``runs/<run_id>``; refuses a run id that is not a plain name.

        Checked here as well as on the command line (defence in depth): every
        path of a run is built from this one, so no caller can escape ``runs/``.
        """
        return self.runs_dir / check_run_id(run_id)


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
    def cross_dataset_csv(self) -> Path:
        """Scores of the run's global part on other datasets (``pfedmoap evaluate --dataset``)."""
        return self.root / "cross_dataset.csv"

    @property
    def flower_log(self) -> Path:
        """Flower's own log of a simulation run (appended to by every start)."""
        return self.root / "flower.log"

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
