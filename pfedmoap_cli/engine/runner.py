"""Start, resume or finish one run: the entry point shared by ``train`` and ``sweep``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pfedmoap_cli.artifacts.partition import Partition, load_partition
from pfedmoap_cli.artifacts.run_lock import RunLock
from pfedmoap_cli.engine.federation import Federation, RoundSummary
from pfedmoap_cli.engine.run_record import completed_rounds, write_run_record
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings, default_run_id
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import ArtifactError


class IfExists(str, Enum):
    """What to do when the run folder is already there."""

    ERROR = "error"  # a new run was asked for
    RESUME = "resume"  # continue it; a missing run is an error
    AUTO = "auto"  # continue it if present, start it otherwise (sweeps)


@dataclass(frozen=True)
class RunOutcome:
    """Where a run stands after :func:`execute_run`."""

    run_id: str
    paths: RunPaths
    completed_rounds: int
    total_rounds: int
    last_round: RoundSummary | None

    @property
    def finished(self) -> bool:
        return self.completed_rounds >= self.total_rounds


def execute_run(
    workspace: Workspace,
    data_root: Path,
    settings: TrainSettings,
    partition_path: Path,
    run_id: str | None = None,
    if_exists: IfExists = IfExists.ERROR,
    progress: bool = True,
    stop_after: int | None = None,
) -> RunOutcome:
    """Train ``settings`` on the partition at ``partition_path`` as far as it goes.

    Raises
    ------
    ArtifactError
        The run exists and ``if_exists`` is ERROR, it is missing and
        ``if_exists`` is RESUME, or its partition changed since it started.
    RunInUse
        Another process is training this run (its lock is held).
    """
    partition, partition_sha = load_partition(partition_path)
    run_id = run_id or default_run_id(settings, partition.dataset, partition_sha)
    with RunLock(workspace.locks_dir, run_id):
        return _execute_locked(workspace, data_root, settings, partition_path, partition, partition_sha, run_id, if_exists, progress, stop_after)


def _execute_locked(
    workspace: Workspace,
    data_root: Path,
    settings: TrainSettings,
    partition_path: Path,
    partition: Partition,
    partition_sha: str,
    run_id: str,
    if_exists: IfExists,
    progress: bool,
    stop_after: int | None,
) -> RunOutcome:
    """:func:`execute_run` once the run's lock is held."""
    paths = RunPaths(workspace.run_dir(run_id))
    exists = paths.run_json.is_file()
    done = completed_rounds(paths) if exists else 0
    if exists and if_exists is IfExists.ERROR:
        raise ArtifactError(
            f"run {run_id} already exists ({done}/{settings.rounds} rounds); pass --resume to continue it or --run-id NAME for a new run"
        )
    if not exists and if_exists is IfExists.RESUME:
        raise ArtifactError(f"no run {run_id} to resume (no run matches these settings); start it without --resume")
    if done >= settings.rounds:
        return RunOutcome(run_id, paths, done, settings.rounds, None)
    session = open_session(settings, partition, partition_sha, data_root, workspace.features_cache_dir, progress=progress)
    if not exists:
        write_run_record(paths, run_id, settings, partition.dataset, Path(partition_path).resolve(), partition_sha)
    summaries: list[RoundSummary] = []
    finished = Federation(session, run_id, paths, progress=progress).run(stop_after=stop_after, on_round=summaries.append)
    return RunOutcome(run_id, paths, finished, settings.rounds, summaries[-1] if summaries else None)
