"""The tracker interface, and the rules that keep one tracker run per run with each round logged once.

A :class:`Tracker` (one per ``--report-to`` name, reused across the runs of a
sweep) is a run observer of :func:`pfedmoap_cli.engine.runner.execute_run`:
``open(job, completed_rounds)`` returns a :class:`TrackerRun` whose
``log_round(round_index, rows)`` is called after each complete round and
``close()`` when training stops.

Resume rules (``runs/<id>/tracking.json`` keeps each tracker's run identity
and ``logged_rounds``, see :mod:`pfedmoap_cli.tracking.state`):

* the same tracker run is continued, never a second one started;
* rounds the run completed but the tracker has not seen (training without
  ``--report-to``, or a stop between a round's files and its log entry) are
  logged first, read back from their round manifests;
* rounds already logged are not logged again, except those the run trains
  again after falling back to an earlier verified round (damaged files):
  the backend's ``first_round`` says where it starts, and each backend
  documents what a rewritten round looks like.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from pfedmoap_cli.artifacts.metrics import MetricRow
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.tracking.params import Scalar, hyperparameters
from pfedmoap_cli.tracking.rows import round_rows
from pfedmoap_cli.tracking.state import read_tracker, write_tracker
from pfedmoap_cli.tracking.summary import client_accuracies, round_scalars

if TYPE_CHECKING:  # pragma: no cover
    from pfedmoap_cli.engine.runner import RunJob


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker knows of a run: its id and folder, its size, its settings as hyperparameters."""

    run_id: str
    paths: RunPaths
    workspace_root: Path
    total_rounds: int
    hyperparameters: Mapping[str, Scalar]

    @classmethod
    def of(cls, job: "RunJob") -> "TrackedRun":
        params = hyperparameters(job.settings, job.run_id, job.partition.dataset, job.partition_sha256)
        return cls(job.run_id, job.paths, Path(job.workspace.root), job.settings.rounds, params)


class TrackerBackend(ABC):
    """One open run in one tracking library."""

    #: The first round this backend logs (rounds before it are in the tracker already).
    first_round: int = 0

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What tracking.json keeps to continue this tracker run on resume."""

    @abstractmethod
    def log(self, round_index: int, scalars: Mapping[str, float], accuracies: Mapping[int, float]) -> None:
        """Log one round's scalars (see :mod:`~pfedmoap_cli.tracking.summary`) and per-client accuracies; flush."""

    @abstractmethod
    def close(self, complete: bool) -> None:
        """Finish (``complete``: every round of the run logged) or leave the tracker run to be resumed."""


class TrackerRun:
    """A run followed by one tracker: catches up on open, logs each round once, keeps tracking.json."""

    def __init__(self, name: str, run: TrackedRun, backend: TrackerBackend, completed_rounds: int) -> None:
        self.name, self.run, self.backend = name, run, backend
        self.next_round = backend.first_round
        self._save()  # the tracker run's identity, before any round: a stop now still resumes it
        self._catch_up(completed_rounds)

    def _save(self) -> None:
        write_tracker(self.run.paths.root, self.name, {**self.backend.identity(), "logged_rounds": self.next_round})

    def _catch_up(self, until: int) -> None:
        """Log the complete rounds before ``until`` the tracker has not seen, from their manifests."""
        for round_index in range(self.next_round, until):
            self._log(round_index, round_rows(self.run.paths, round_index))

    def _log(self, round_index: int, rows: Sequence[MetricRow]) -> None:
        self.backend.log(round_index, round_scalars(rows), client_accuracies(rows))
        self.next_round = round_index + 1
        self._save()

    def log_round(self, round_index: int, rows: Sequence[MetricRow]) -> None:
        """Log a complete round (once: a round before :attr:`next_round` is in the tracker already)."""
        if round_index < self.next_round:
            return
        self._catch_up(round_index)
        self._log(round_index, rows)

    def close(self) -> None:
        self.backend.close(complete=self.next_round >= self.run.total_rounds)


class Tracker(ABC):
    """One ``--report-to`` choice: opens a :class:`TrackerRun` for each run it follows."""

    #: The ``--report-to`` name, also the key in tracking.json.
    name: ClassVar[str]

    @abstractmethod
    def start(self, run: TrackedRun, entry: dict[str, Any] | None, completed_rounds: int) -> TrackerBackend:
        """Open the library's run: continue ``entry``'s (tracking.json) or start one.

        ``completed_rounds`` is how many rounds the run has verified; rounds from
        it on are trained (again) and logged after this returns.
        """

    def open(self, job: "RunJob", completed_rounds: int) -> TrackerRun:
        """Start following ``job`` (the run observer hook of ``execute_run``)."""
        run = TrackedRun.of(job)
        backend = self.start(run, read_tracker(run.paths.root, self.name), completed_rounds)
        return TrackerRun(self.name, run, backend, completed_rounds)


def logged_rounds(entry: Mapping[str, Any] | None) -> int:
    """``logged_rounds`` of a tracking.json entry (0 when there is none)."""
    try:
        return max(int((entry or {}).get("logged_rounds", 0)), 0)
    except (TypeError, ValueError):
        return 0
