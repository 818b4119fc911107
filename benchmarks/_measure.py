"""Per-round measurements of real runs: wall time, evaluation time, checkpoint bytes written.

A run is trained by the engine's own entry point (:func:`execute_run`, what
``pfedmoap train`` and ``api.train`` call); :class:`RoundClock` follows it as
a run observer (the ``--report-to`` hook), so nothing of the round loop is
re-implemented here and whatever the engine does in a round is what is timed:
local updates, aggregation, evaluation, metrics and checkpoints.

* Round time: from the moment the run's rounds start (the observer is opened
  after the session -- backbone, dataset, test features -- is ready) to the
  moment the round is sealed, then from one sealed round to the next.
* Evaluation time: :meth:`Federation.evaluate_round` (scoring every client on its
  own test set, and on base-to-novel partitions on all base and novel images) is wrapped while runs are measured; a round that does not
  evaluate (``eval_every``) adds nothing.
* Checkpoint bytes: files under the run folder created or replaced during the
  round (checkpoints and manifests; run-level bookkeeping -- run.json,
  progress.json, metrics.csv -- left out), whatever layout the engine uses.

:func:`measure_runs_in_turn` trains several runs at once, one thread each,
taking their rounds strictly in turn (A0 B0 A1 B1 ...): only one round runs at
any moment, and a slow stretch of a shared machine hits every variant alike
instead of whichever happened to run then.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.runner import RunJob, execute_run
from pfedmoap_cli.engine.settings import TrainSettings, validate_settings
from pfedmoap_cli.engine.workspace import Workspace

#: Run-level files rewritten or appended every round that are not checkpoints.
BOOKKEEPING = frozenset({"run.json", "progress.json", "metrics.csv", "evaluation.csv"})


@dataclass(frozen=True)
class RoundMeasure:
    """One round of one run."""

    round_index: int
    #: time.perf_counter() when the round started and when it was sealed.
    started: float
    ended: float
    eval_seconds: float
    checkpoint_bytes: int
    checkpoint_files: int

    @property
    def seconds(self) -> float:
        """Wall time of the whole round."""
        return self.ended - self.started

    @property
    def train_seconds(self) -> float:
        """Everything in the round but evaluation: local updates, aggregation, writing."""
        return self.seconds - self.eval_seconds


FileKey = tuple[int, int, int]  # inode, size, mtime_ns: a replaced or rewritten file changes one of them


def file_snapshot(root: Path) -> dict[str, FileKey]:
    """Every file under ``root`` but the bookkeeping ones, with what identifies its current content."""
    found: dict[str, FileKey] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name in BOOKKEEPING and Path(folder) == root:
                continue
            path = os.path.join(folder, name)
            try:
                stat = os.stat(path)
            except FileNotFoundError:  # removed while walking (an older round pruned)
                continue
            found[path] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return found


def written_since(before: dict[str, FileKey], after: dict[str, FileKey]) -> tuple[int, int]:
    """(bytes, files) of the files in ``after`` that are new or changed since ``before``."""
    changed = [key for path, key in after.items() if before.get(path) != key]
    return sum(size for _, size, _ in changed), len(changed)


class Turns:
    """Lets several runs take their rounds one at a time, in a fixed rotation."""

    def __init__(self, names: Sequence[str]) -> None:
        self._active = list(names)
        self._turn = 0
        self._changed = threading.Condition()

    def _current(self) -> str | None:
        return self._active[self._turn] if self._active else None

    def wait(self, name: str) -> None:
        """Block until it is ``name``'s turn."""
        with self._changed:
            self._changed.wait_for(lambda: self._current() == name)

    def pass_on(self, name: str) -> None:
        """``name`` finished a round: the next run in the rotation goes."""
        with self._changed:
            self._turn = (self._active.index(name) + 1) % len(self._active)
            self._changed.notify_all()

    def leave(self, name: str) -> None:
        """``name`` has no more rounds (finished or failed): drop it from the rotation."""
        with self._changed:
            if name not in self._active:
                return
            current, index = self._current(), self._active.index(name)
            self._active.remove(name)
            if self._active:
                self._turn = index % len(self._active) if current == name else self._active.index(current)
            self._changed.notify_all()


#: The clock of the run each thread is training (for the evaluation timer).
_CLOCK_OF_THREAD: dict[int, "RoundClock"] = {}


class RoundClock:
    """A run observer that measures every round it is told about (see the module docstring).

    With ``turns``, the run waits for its turn before each round (and the
    time waiting is not counted).
    """

    def __init__(self, name: str = "run", turns: Turns | None = None) -> None:
        self.name = name
        self.turns = turns
        self.rounds: list[RoundMeasure] = []
        self.opened = threading.Event()
        self.eval_seconds = 0.0
        self._root: Path | None = None
        self._snapshot: dict[str, FileKey] = {}
        self._start = 0.0

    # -- RunObserver / RoundObserver ---------------------------------------------------
    def open(self, job: RunJob, completed_rounds: int) -> "RoundClock":
        self._root = job.paths.root
        _CLOCK_OF_THREAD[threading.get_ident()] = self
        self.opened.set()
        self._restart()
        return self

    def log_round(self, round_index: int, rows: Sequence) -> None:
        ended = time.perf_counter()
        after = file_snapshot(self._root)
        written, files = written_since(self._snapshot, after)
        self.rounds.append(RoundMeasure(round_index, self._start, ended, self.eval_seconds, written, files))
        if self.turns is not None:
            self.turns.pass_on(self.name)
        self._restart(after)  # neither the snapshot nor the wait is part of the next round's time

    def close(self) -> None:
        if self.turns is not None:
            self.turns.leave(self.name)

    def _restart(self, snapshot: dict[str, FileKey] | None = None) -> None:
        if self.turns is not None:
            self.turns.wait(self.name)
        self._snapshot = file_snapshot(self._root) if snapshot is None else snapshot
        self.eval_seconds = 0.0
        self._start = time.perf_counter()


@contextlib.contextmanager
def timing_evaluation() -> Iterator[None]:
    """Within the block, time spent in :meth:`Federation.evaluate_round` is added to the calling thread's round."""
    original = Federation.evaluate_round

    def evaluate(federation, view):
        start = time.perf_counter()
        try:
            return original(federation, view)
        finally:
            clock = _CLOCK_OF_THREAD.get(threading.get_ident())
            if clock is not None:
                clock.eval_seconds += time.perf_counter() - start

    Federation.evaluate_round = evaluate
    try:
        yield
    finally:
        Federation.evaluate_round = original


def _execute(workspace: Path, data_root: Path, settings: TrainSettings, partition_path: Path, run_id: str, clock: RoundClock) -> None:
    execute_run(
        Workspace(Path(workspace)), Path(data_root), validate_settings(settings), Path(partition_path),
        run_id=run_id, progress=False, observers=[clock],
    )


def measure_run(workspace: Path, data_root: Path, settings: TrainSettings, partition_path: Path, run_id: str) -> list[RoundMeasure]:
    """Train a new run ``run_id`` to the end through :func:`execute_run`; its rounds' measures."""
    clock = RoundClock(run_id)
    with timing_evaluation():
        _execute(workspace, data_root, settings, partition_path, run_id, clock)
    return clock.rounds


def measure_runs_in_turn(
    workspace: Path, data_root: Path, runs: dict[str, TrainSettings], partition_path: Path, threads: int = 1
) -> dict[str, list[RoundMeasure]]:
    """Train the new runs ``runs`` (run id -> settings) with their rounds in turn; each one's measures.

    Each run gets a thread; the next thread starts once the previous run's
    session is ready, so sessions are not built concurrently (the first
    builds the shared test-feature cache; the others read it). Only round 0
    of a run can overlap another run's setup: treat it as a warm-up.
    """
    turns = Turns(list(runs))
    clocks = {run_id: RoundClock(run_id, turns) for run_id in runs}
    failures: dict[str, BaseException] = {}

    def train(run_id: str) -> None:
        torch.set_num_threads(threads)  # a per-thread setting under OpenMP
        try:
            _execute(workspace, data_root, runs[run_id], partition_path, run_id, clocks[run_id])
        except BaseException as error:  # reported by the caller's thread below
            failures[run_id] = error
        finally:
            clocks[run_id].opened.set()
            turns.leave(run_id)

    with timing_evaluation():
        workers = []
        for run_id in runs:
            worker = threading.Thread(target=train, args=(run_id,), name=f"bench-{run_id}", daemon=True)
            worker.start()
            workers.append(worker)
            clocks[run_id].opened.wait()
        for worker in workers:
            worker.join()
    if failures:
        run_id, error = next(iter(failures.items()))
        raise RuntimeError(f"run {run_id} failed: {type(error).__name__}: {error}") from error
    return {run_id: clock.rounds for run_id, clock in clocks.items()}


def median_seconds(rounds: Sequence[RoundMeasure], skip: int = 1) -> float:
    """Median round time after the first ``skip`` (warm-up) rounds."""
    return statistics.median(r.seconds for r in rounds[skip:])
