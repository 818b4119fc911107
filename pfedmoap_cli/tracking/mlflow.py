"""``--report-to mlflow``: one MLflow run per pfedmoap run, in a local file store by default.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``WORKSPACE/mlruns``
(a ``file:`` URI); the experiment is ``MLFLOW_EXPERIMENT_NAME`` or
``pfedmoap``. MLflow >= 3.7 keeps its file store in maintenance mode and
refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is true, so that variable is
set (unless already given) when the store is a file store. View it with
``mlflow ui --backend-store-uri WORKSPACE/mlruns`` (the UI needs the full
``mlflow`` package; the extra installs the lighter ``mlflow-skinny``).

Each round is one step (the round index), with the scalars of
:mod:`~pfedmoap_cli.tracking.summary`; the settings are the run's params,
logged once when the MLflow run is created. The run is named after the
pfedmoap run and tagged ``pfedmoap.run_id``.

Resume continues the MLflow run recorded in tracking.json (its status set
back to RUNNING); which rounds it holds is read from its own metric history,
so a round logged just before a crash is not logged twice. A round retrained
after a fallback is logged again at its step: MLflow keeps both points in the
metric's history and shows the later one as the run's value. A run stopped
before its last round is left KILLED, a finished one FINISHED.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.tracking.base import TrackedRun, Tracker, TrackerBackend

DEFAULT_EXPERIMENT = "pfedmoap"
#: The metric whose history says which rounds an MLflow run holds: one logged
#: every round (accuracy is not: ``--eval-every`` skips rounds).
ROUND_KEY = "clients/participants"
#: The round key of MLflow runs logged before ``--eval-every`` (every round had accuracy then).
LEGACY_ROUND_KEY = "accuracy/mean"
_BATCH = 500  # MLflow takes at most 1000 metrics and 100 params per log_batch


def tracking_uri(workspace_root: Path) -> str:
    """``MLFLOW_TRACKING_URI``, or the file store ``WORKSPACE/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(workspace_root) / "mlruns").resolve().as_uri()


def is_file_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _MlflowRun(TrackerBackend):
    def __init__(self, client: Any, uri: str, experiment_id: str, run_id: str, first_round: int) -> None:
        self.client, self.uri, self.experiment_id, self.run_id = client, uri, experiment_id, run_id
        self.first_round = first_round

    def identity(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri}

    def log(self, round_index: int, scalars: Mapping[str, float], accuracies: Mapping[int, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, round_index) for key, value in scalars.items()]
        # The round key last: its history is what a resume reads, so a round counts once all of it is in.
        metrics.sort(key=lambda m: m.key == ROUND_KEY)
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH])

    def close(self, complete: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if complete else "KILLED")


class MlflowTracker(Tracker):
    name = "mlflow"

    def start(self, run: TrackedRun, entry: dict[str, Any] | None, completed_rounds: int) -> TrackerBackend:
        uri = tracking_uri(run.workspace_root)
        if is_file_store(uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(tracking_uri=uri)
            if entry and entry.get("run_id"):
                return self._resume(client, uri, entry, completed_rounds, MlflowException)
            return self._create(client, uri, run)
        except MlflowException as error:
            raise ConfigError(f"--report-to mlflow: the tracking store {uri} refused: {_first_line(error)}") from None

    def _resume(self, client: Any, uri: str, entry: dict[str, Any], completed_rounds: int, MlflowException: type) -> TrackerBackend:
        run_id = str(entry["run_id"])
        try:
            found = client.get_run(run_id)
        except MlflowException:
            raise ConfigError(
                f"this run's MLflow run {run_id} (tracking.json) is not in the tracking store {uri}; set MLFLOW_TRACKING_URI to "
                f"the store it was logged to ({entry.get('tracking_uri', 'unknown')}) or delete tracking.json's mlflow entry to start a new one"
            ) from None
        client.update_run(run_id, status="RUNNING")
        steps = [m.step for m in client.get_metric_history(run_id, ROUND_KEY)]
        if not steps:  # a run logged by an older version
            steps = [m.step for m in client.get_metric_history(run_id, LEGACY_ROUND_KEY)]
        logged = max(steps) + 1 if steps else 0
        return _MlflowRun(client, uri, found.info.experiment_id, run_id, min(logged, completed_rounds))

    def _create(self, client: Any, uri: str, run: TrackedRun) -> TrackerBackend:
        from mlflow.entities import Param

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
        created = client.create_run(experiment_id, run_name=run.run_id, tags={"pfedmoap.run_id": run.run_id})
        run_id = created.info.run_id
        params = [Param(key, str(value)) for key, value in run.hyperparameters.items()]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        return _MlflowRun(client, uri, experiment_id, run_id, 0)
