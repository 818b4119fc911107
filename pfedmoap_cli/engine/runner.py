"""Start, resume or finish one run: the entry point shared by ``train`` and ``sweep``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Protocol, Sequence

from pfedmoap_cli.artifacts.metrics import MetricRow
from pfedmoap_cli.artifacts.partition import Partition, load_partition
from pfedmoap_cli.artifacts.run_lock import RunLock
from pfedmoap_cli.engine.federation import Federation, RoundSummary
from pfedmoap_cli.engine.run_record import prepare_resume, progress_note, remove_temp_files, write_run_record
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings, default_run_id
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import ArtifactError, ConfigError


class IfExists(str, Enum):
    """What to do when the run folder is already there."""

    ERROR = "error"  # a new run was asked for
    RESUME = "resume"  # continue it; a missing run is an error
    AUTO = "auto"  # continue it if present, start it otherwise (sweeps)


@dataclass(frozen=True)
class RunJob:
    """One run ready to train: everything a runtime needs besides its own options."""

    workspace: Workspace
    data_root: Path
    settings: TrainSettings
    partition_path: Path
    partition: Partition
    partition_sha256: str
    run_id: str
    paths: RunPaths
    progress: bool


#: Trains from the last complete round; returns the rounds complete when it returns.
Trainer = Callable[[int | None, Callable[[RoundSummary], None]], int]


class Runtime(Protocol):
    """Where a run's rounds execute: this process, or Flower (simulation or deployment)."""

    def open(self, job: RunJob) -> Trainer:
        """Check and load what the run needs (user errors surface here, before run.json is written)."""


class LocalRuntime:
    """Every client in this process, one after another (the default engine)."""

    def open(self, job: RunJob) -> Trainer:
        session = open_session(job.settings, job.partition, job.partition_sha256, job.data_root, job.workspace.features_cache_dir, progress=job.progress)
        federation = Federation(session, job.run_id, job.paths, progress=job.progress)
        return lambda stop_after, on_round: federation.run(stop_after=stop_after, on_round=on_round)


class RoundObserver(Protocol):
    """Follows one run: told each complete round with its rows as the run sealed them."""

    def log_round(self, round_index: int, rows: Sequence[MetricRow]) -> None: ...

    def close(self) -> None: ...


class RunObserver(Protocol):
    """Follows runs (an experiment tracker, ``--report-to``); one object serves every run of a sweep."""

    def open(self, job: RunJob, completed_rounds: int) -> RoundObserver:
        """Start following ``job``, whose first ``completed_rounds`` rounds are complete and verified."""


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
    runtime: Runtime | None = None,
    observers: Sequence[RunObserver] | None = None,
) -> RunOutcome:
    """Train ``settings`` on the partition at ``partition_path`` as far as it goes.

    ``runtime`` decides where the rounds run (default: :class:`LocalRuntime`);
    every runtime writes the same run folder. ``observers`` are opened once the
    run's complete rounds are known and told each round after it is complete,
    with its rows read back from the round's manifest, whichever runtime
    trained it.

    Raises
    ------
    ArtifactError
        The run exists and ``if_exists`` is ERROR, it is missing and
        ``if_exists`` is RESUME, or its partition changed since it started.
    RunInUse
        Another process is training this run (its lock is held).
    ConfigError
        A base-to-novel partition on a runtime other than the local one (its
        base and novel scores are the local engine's).
    """
    partition, partition_sha = load_partition(partition_path)
    if partition.base_to_novel and runtime is not None and not isinstance(runtime, LocalRuntime):
        refuse_base_to_novel_on_flower(Path(partition_path))
    run_id = run_id or default_run_id(settings, partition.dataset, partition_sha)
    with RunLock(workspace.locks_dir, run_id):
        paths = RunPaths(workspace.run_dir(run_id))
        job = RunJob(workspace, Path(data_root), settings, Path(partition_path), partition, partition_sha, run_id, paths, progress)
        return _execute_locked(job, if_exists, stop_after, runtime or LocalRuntime(), tuple(observers or ()))


def refuse_base_to_novel_on_flower(partition_path: Path) -> None:
    """Refuse to train a base-to-novel partition on Flower: its base/novel scores are computed by the local engine.

    Raises
    ------
    ConfigError
        Always, naming the partition and the fix.
    """
    raise ConfigError(
        f"partition {partition_path.name} is base-to-novel and base-to-novel evaluation runs on the local engine; "
        "drop --engine flower (or train on a partition made without --base-to-novel)"
    )


def _open_observers(job: RunJob, done: int, observers: Sequence[RunObserver]) -> list[RoundObserver]:
    opened: list[RoundObserver] = []
    try:
        for observer in observers:
            opened.append(observer.open(job, done))
    except BaseException:
        _close_observers(opened)
        raise
    return opened


def _close_observers(opened: Sequence[RoundObserver]) -> None:
    for observer in opened:
        observer.close()


def _execute_locked(
    job: RunJob, if_exists: IfExists, stop_after: int | None, runtime: Runtime, observers: Sequence[RunObserver] = ()
) -> RunOutcome:
    """:func:`execute_run` once the run's lock is held."""
    paths, settings, run_id = job.paths, job.settings, job.run_id
    exists = paths.run_json.is_file()
    if exists and if_exists is IfExists.ERROR:
        raise ArtifactError(
            f"run {run_id} already exists ({progress_note(paths, settings.rounds)} rounds); pass --resume to continue it or --run-id NAME for a new run"
        )
    if not exists and if_exists is IfExists.RESUME:
        raise ArtifactError(f"no run {run_id} to resume (no run matches these settings); start it without --resume")
    # Only rounds whose files verify count; the folder is repaired to the last of them.
    done = prepare_resume(paths, run_id, settings.method, settings.rounds) if exists else 0
    if not exists and paths.root.is_dir():
        remove_temp_files(paths.root)  # a run killed while writing its run.json starts anew, without the leftover
    if done >= settings.rounds:
        _close_observers(_open_observers(job, done, observers))  # they catch up on rounds they have not seen
        return RunOutcome(run_id, paths, done, settings.rounds, None)
    if paths.clients_on_nodes.is_file() and not getattr(runtime, "clients_on_nodes", False):
        raise ArtifactError(
            f"the client states of run {run_id} live on its Flower SuperNodes, not in {paths.root}; "
            "continue it there by running its Flower app again (flwr run APP_DIR SUPERLINK)"
        )
    trainer = runtime.open(job)
    if not exists:
        write_run_record(
            paths, run_id, settings, job.partition.dataset, job.partition_path.resolve(), job.partition_sha256, job.workspace.root
        )
    summaries: list[RoundSummary] = []
    opened = _open_observers(job, done, observers)

    def on_round(summary: RoundSummary) -> None:
        summaries.append(summary)
        if opened:
            from pfedmoap_cli.tracking.rows import round_rows

            rows = round_rows(paths, summary.round_index)  # what the round sealed, whichever runtime wrote it
            for observer in opened:
                observer.log_round(summary.round_index, rows)

    try:
        finished = trainer(stop_after, on_round)
    finally:
        _close_observers(opened)
    return RunOutcome(run_id, paths, finished, settings.rounds, summaries[-1] if summaries else None)
