"""A paper table from the runs present: mean +- std over seeds per cell, beside the paper's values.

Definitions (PROTOCOL.md section 4):

* a run's number is its last-round unweighted mean over clients of test
  top-1 accuracy (:func:`pfedmoap_cli.report.runs.summarize_metrics`); a
  per-domain column is the last-round mean over that domain's clients, and
  ``avg`` is the run's headline (the mean over all clients: with equal
  clients per domain, also the mean of the domain columns);
* a cell is the mean over the table's seeds and the SAMPLE standard deviation
  (ddof = 1) -- the spread of 3 seeds as an estimate of seed-to-seed
  variation, the usual reading of a paper's "mean +- std over 3 seeds";
* only finished runs count, and a cell is reported only when every seed has
  one: a cell short of seeds says how many are missing (and how many are
  still running or were interrupted) instead of averaging fewer;
* each seed's run is the one on that seed's partition (by default built with
  the run seed, so the std includes the partition's variance; a recipe may
  fix one partition for all seeds), and the report says which it was;
* a base-to-novel table (PROTOCOL-MORE.md section 6) has five columns per
  dataset, each a per-run value of the final round, then mean +- std over
  seeds like any cell: Local (the headline above), Base and Novel (the
  unweighted mean over clients of the rows of split ``base`` / ``novel``),
  HM = 2 B N / (B + N) (two-way) and HM3 = 3 / (1/L + 1/B + 1/N) (three-way,
  FedTPG's), all as :func:`summarize_metrics` computes them for the run. A
  run that records no ``novel`` rows (a method whose state is tied to its
  training classes) has no Novel, HM or HM3: those cells are "not
  applicable", not missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

import numpy as np
import pandas as pd

from pfedmoap_cli.engine.workspace import Workspace
from pfedmoap_cli.report.cells import DONE, PARTIAL, CellRun, TablePartitions, cell_runs, find_partitions
from pfedmoap_cli.report.runs import checked_run_metrics, damaged_run_warning, summarize_metrics
from pfedmoap_cli.report.table_recipes import AVG, BASE, HM, HM3, LOCAL, NOVEL, Column, PaperValue, TableRecipe

STD_DDOF = 1


@dataclass(frozen=True)
class CellStat:
    """One (row, column) of a table: our statistic, the paper's, and the seeds behind them."""

    row: str
    column: Column
    seeds_expected: int
    values: tuple[float, ...]  # one per finished seed, in seed order (percent)
    seeds_done: tuple[int, ...]
    seeds_partial: tuple[int, ...]
    seeds_missing: tuple[int, ...]  # not finished (partial ones included)
    run_ids: tuple[str, ...]
    paper: PaperValue | None
    seeds_damaged: tuple[int, ...] = ()  # finished, but left out: their metrics are damaged or incomplete
    seeds_na: tuple[int, ...] = ()  # finished, but the column does not apply to their runs (no novel rows)

    @property
    def not_applicable(self) -> bool:
        """The column does not apply to this row: its finished runs have no value by design, and none has one."""
        return bool(self.seeds_na) and not self.values

    @property
    def complete(self) -> bool:
        return not self.seeds_missing and len(self.values) == self.seeds_expected

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.complete else None

    @property
    def std(self) -> float | None:
        """Sample std (ddof=1) over seeds; None when incomplete or with a single seed."""
        if not self.complete or len(self.values) <= STD_DDOF:
            return None
        return float(np.std(self.values, ddof=STD_DDOF))

    @property
    def diff(self) -> float | None:
        """Ours minus the paper's mean, in percentage points."""
        return None if self.mean is None or self.paper is None else self.mean - self.paper.mean

    def missing_text(self) -> str:
        text = f"missing {len(self.seeds_missing)}/{self.seeds_expected} seeds"
        notes = []
        if self.seeds_partial:
            notes.append(f"{len(self.seeds_partial)} partial")
        if self.seeds_damaged:
            notes.append(f"{len(self.seeds_damaged)} damaged")
        if self.seeds_na:
            notes.append(f"{len(self.seeds_na)} without novel rows")
        return text + (f" ({', '.join(notes)})" if notes else "")


@dataclass
class TableReport:
    """A built table plus what it was built from."""

    recipe: TableRecipe
    cells: dict[tuple[str, str, str], CellStat]  # (row, dataset, column key)
    runs: list[CellRun]
    partitions: TablePartitions  # (dataset key, partition seed) -> partition, None where none exists yet
    metrics: dict[str, pd.DataFrame] = field(default_factory=dict)  # run id -> metrics of finished runs
    excluded: dict[str, str] = field(default_factory=dict)  # run id -> why its finished run was left out

    def cell(self, row: str, column: Column) -> CellStat:
        return self.cells[(row, column.dataset, column.key)]

    @property
    def complete_cells(self) -> int:
        return sum(c.complete for c in self.cells.values())

    def best(self, column: Column) -> set[str]:
        """The rows with the highest complete mean in ``column`` (all of them on a tie; empty when none is complete)."""
        scored = {row: c.mean for (row, ds, key), c in self.cells.items() if ds == column.dataset and key == column.key and c.complete}
        top = max(scored.values(), default=None)
        return {row for row, mean in scored.items() if top is not None and mean >= top - 1e-9}


def generalisation_values(metrics: pd.DataFrame) -> dict[str, float | None]:
    """A finished run's Local, Base, Novel, HM and HM3 (percent) in its final round, from its run summary.

    NaN: the run has no base rows (missing); None: the run records no novel
    rows, so Novel, HM and HM3 do not apply to it. (The rows of a finished
    run are complete: :func:`load_finished_metrics` leaves out a base-to-novel
    run that lacks base rows, or novel rows its method should record.)
    """
    summary = summarize_metrics(metrics)
    if summary.base_acc is None:
        return {LOCAL: summary.final_mean_acc, BASE: math.nan, NOVEL: math.nan, HM: math.nan, HM3: math.nan}
    return {LOCAL: summary.local_acc, BASE: summary.base_acc, NOVEL: summary.novel_acc, HM: summary.hm, HM3: summary.hm3}


def run_columns(metrics: pd.DataFrame, recipe: TableRecipe, dataset: str) -> dict[str, float | None]:
    """A finished run's value (percent) in each of the dataset's columns (None: the column does not apply to the run)."""
    if recipe.generalisation:
        return generalisation_values(metrics)
    summary = summarize_metrics(metrics)
    if not recipe.per_domain:
        return {dataset: summary.final_mean_acc}
    acc = metrics[(metrics["split"] == "test") & (metrics["metric"] == "accuracy")]
    last = acc[acc["round"] == acc["round"].max()]
    by_domain = last.groupby("domain")["value"].mean() * 100
    values = {domain: float(v) for domain, v in by_domain.items()}
    values[AVG] = summary.final_mean_acc
    return values


def build_table(
    recipe: TableRecipe, runs: list[CellRun], metrics: Mapping[str, pd.DataFrame], damaged: Collection[str] = ()
) -> dict[tuple[str, str, str], CellStat]:
    """Cells of the table from the cells' run states and the finished runs' metrics.

    ``metrics`` maps a run id to its metrics frame; runs whose status is not
    ``done`` are never read. A finished run that lacks a column's domain
    leaves that seed missing in that column; one in ``damaged`` (left out of
    ``metrics`` for damaged or incomplete rows) is missing and counted as such;
    one whose value is None there (no novel rows) is "not applicable", not missing.
    """
    by_cell: dict[tuple[str, str], list[CellRun]] = {}
    for run in runs:
        by_cell.setdefault((run.dataset, run.row), []).append(run)
    values_of: dict[str, dict[str, float]] = {}
    cells: dict[tuple[str, str, str], CellStat] = {}
    for column in recipe.columns():
        for row in recipe.rows:
            seeds = sorted(by_cell.get((column.dataset, row.key), []), key=lambda r: recipe.seeds.index(r.seed))
            values, done, partial, missing, run_ids, broken, na = [], [], [], [], [], [], []
            for seed in recipe.seeds:
                run = next((r for r in seeds if r.seed == seed), None)
                value = None
                if run is not None and run.status == DONE and run.run_id in metrics:
                    if run.run_id not in values_of:
                        values_of[run.run_id] = run_columns(metrics[run.run_id], recipe, column.dataset)
                    if column.key in values_of[run.run_id] and values_of[run.run_id][column.key] is None:
                        na.append(seed)
                        continue
                    value = values_of[run.run_id].get(column.key)
                if value is None or math.isnan(value):
                    missing.append(seed)
                    if run is not None and run.status == PARTIAL:
                        partial.append(seed)
                    elif run is not None and run.run_id in damaged:
                        broken.append(seed)
                else:
                    values.append(value)
                    done.append(seed)
                    run_ids.append(run.run_id)
            cells[(row.key, column.dataset, column.key)] = CellStat(
                row=row.key,
                column=column,
                seeds_expected=len(recipe.seeds),
                values=tuple(values),
                seeds_done=tuple(done),
                seeds_partial=tuple(partial),
                seeds_missing=tuple(missing),
                run_ids=tuple(run_ids),
                paper=recipe.paper_value(row.key, column),
                seeds_damaged=tuple(broken),
                seeds_na=tuple(na),
            )
    return cells


def load_finished_metrics(
    ws: Workspace, runs: list[CellRun], warn: Callable[[str], None] | None = None
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Metrics of every finished run (rows of rounds past its last one dropped), and the runs left out.

    A finished run whose metrics.csv is damaged, or whose rows do not cover
    every client of every round, is left out (its cell then lacks that seed)
    and reported through ``warn``, one line each.
    """
    frames: dict[str, pd.DataFrame] = {}
    excluded: dict[str, str] = {}
    for run in runs:
        if run.status != DONE or run.run_id in frames or run.run_id in excluded:
            continue
        run_dir = ws.run_dir(run.run_id)
        if not (run_dir / "metrics.csv").is_file():
            continue
        frame, reason = checked_run_metrics(run_dir, completed=run.total_rounds)
        if reason is not None:
            excluded[run.run_id] = reason
            if warn is not None:
                warn(damaged_run_warning(run_dir, reason))
            continue
        if ((frame["split"] == "test") & (frame["metric"] == "accuracy")).any():
            frames[run.run_id] = frame
    return frames, excluded


def table_report(ws: Workspace, recipe: TableRecipe, warn: Callable[[str], None] | None = None) -> TableReport:
    """Build the table of ``recipe`` from the runs in workspace ``ws`` (damaged runs reported through ``warn``)."""
    partitions = find_partitions(ws, recipe)
    runs = cell_runs(ws, recipe, partitions)
    metrics, excluded = load_finished_metrics(ws, runs, warn)
    cells = build_table(recipe, runs, metrics, damaged=excluded)
    return TableReport(recipe=recipe, cells=cells, runs=runs, partitions=partitions, metrics=metrics, excluded=excluded)
