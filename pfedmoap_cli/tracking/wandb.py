"""``--report-to wandb``: Weights & Biases, when the ``wandb`` package is installed (not a tested dependency).

wandb reads its own settings from the environment: ``WANDB_MODE=offline``
writes the run under ``WORKSPACE/wandb/`` only (sync it later with
``wandb sync``), ``WANDB_PROJECT`` picks the project (default ``pfedmoap``).
The run is named after the pfedmoap run; its config is the settings. Each
round is logged with a ``round`` step metric.

Resume continues the wandb run whose id tracking.json keeps
(``resume="allow"``). wandb's history cannot be rewritten, so rounds already
logged are never logged again, not even when a fallback retrains them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from pfedmoap_cli.tracking.base import TrackedRun, Tracker, TrackerBackend, logged_rounds

DEFAULT_PROJECT = "pfedmoap"


class _WandbRun(TrackerBackend):
    def __init__(self, wandb: Any, handle: Any, run_id: str, project: str, first_round: int) -> None:
        self.wandb, self.handle, self.run_id, self.project = wandb, handle, run_id, project
        self.first_round = first_round

    def identity(self) -> dict[str, Any]:
        return {"id": self.run_id, "project": self.project}

    def log(self, round_index: int, scalars: Mapping[str, float], accuracies: Mapping[int, float]) -> None:
        data: dict[str, Any] = {"round": round_index, **scalars}
        if accuracies:
            data["accuracy/clients"] = self.wandb.Histogram([accuracies[c] for c in sorted(accuracies)])
        self.handle.log(data)

    def close(self, complete: bool) -> None:
        self.handle.finish(exit_code=0 if complete else 1)


class WandbTracker(Tracker):
    name = "wandb"

    def start(self, run: TrackedRun, entry: dict[str, Any] | None, completed_rounds: int) -> TrackerBackend:
        import wandb

        project = str((entry or {}).get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT)
        run_id = str((entry or {}).get("id") or wandb.util.generate_id())
        handle = wandb.init(
            id=run_id, resume="allow", project=project, name=run.run_id, dir=str(run.workspace_root),
            config=dict(run.hyperparameters) if entry is None else None,
        )
        handle.define_metric("round")
        handle.define_metric("*", step_metric="round")
        # History is append-only: continue after the last round logged.
        first = logged_rounds(entry) if entry else 0
        return _WandbRun(wandb, handle, run_id, project, first)
