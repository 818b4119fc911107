"""Which run holds each cell of a paper table, and how far it got.

A cell (dataset, row, seed) is identified by its run id,
``default_run_id(settings, dataset, partition sha256)``: the same id that
``pfedmoap train`` gives a run with those settings on that partition. The
partition of each dataset is the one ``pfedmoap sweep`` built and recorded in
``sweeps/<table>.json``; without that record (or when its file is gone) it is
found among ``partitions/*.json`` by its dataset, scheme and parameters.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pfedmoap_cli.artifacts.atomic import atomic_write_text, sha256_file
from pfedmoap_cli.artifacts.partition import Partition, load_partition
from pfedmoap_cli.engine.run_record import completed_rounds
from pfedmoap_cli.engine.settings import default_run_id
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import ArtifactError
from pfedmoap_cli.report.table_recipes import DatasetSpec, TableRecipe

SWEEP_SCHEMA = "pfedmoap.sweep/1"

DONE, PARTIAL, MISSING = "done", "partial", "missing"


@dataclass(frozen=True)
class PartitionChoice:
    """The partition a table uses for one dataset."""

    path: Path
    sha256: str
    dataset: str
    note: str = ""


@dataclass(frozen=True)
class CellRun:
    """One (dataset, row, seed) of a table and the state of its run."""

    dataset: str
    row: str
    seed: int
    run_id: str | None  # None: the dataset's partition does not exist yet
    status: str  # done, partial or missing
    completed_rounds: int
    total_rounds: int

    def describe(self) -> str:
        if self.status == PARTIAL:
            return f"partial {self.completed_rounds}/{self.total_rounds} rounds"
        return self.status


def sweeps_dir(ws: Workspace) -> Path:
    return ws.root / "sweeps"


def manifest_path(ws: Workspace, recipe: TableRecipe) -> Path:
    return sweeps_dir(ws) / f"{recipe.stem}.json"


def read_manifest(ws: Workspace, recipe: TableRecipe) -> dict:
    """The sweep record of a table (empty when there is none or it is unreadable)."""
    path = manifest_path(ws, recipe)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) and data.get("schema") == SWEEP_SCHEMA else {}


def record_partitions(ws: Workspace, recipe: TableRecipe, chosen: dict[str, PartitionChoice]) -> Path:
    """Write ``sweeps/<table>.json``: the partition (file, sha256, seed) each dataset uses."""
    record = read_manifest(ws, recipe)
    partitions = dict(record.get("partitions", {}))
    for name, choice in chosen.items():
        partitions[name] = {"file": choice.path.name, "sha256": choice.sha256, "partition_seed": recipe.partition_seed}
    record = {
        "schema": SWEEP_SCHEMA,
        "table": recipe.name,
        "recipe": str(recipe.path),
        "recipe_sha256": sha256_file(recipe.path),
        "partition_seed": recipe.partition_seed,
        "partitions": dict(sorted(partitions.items())),
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = manifest_path(ws, recipe)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def partition_matches(partition: Partition, spec: DatasetSpec, partition_seed: int) -> bool:
    """Whether ``partition`` was made with the table's settings for ``spec``."""
    expected = spec.partition.settings(partition_seed).params()
    if spec.partition.clients_per_domain is not None:
        expected.pop("num_clients")
    params = {k: v for k, v in partition.params.items() if k in expected}
    return (
        partition.dataset == spec.name  # the registered dataset, not the entry's key
        and partition.scheme == spec.partition.scheme_name
        and dict(partition.dataset_options) == dict(spec.partition.dataset_options)
        and params == expected
        and partition.num_clients == spec.partition.clients
    )


def _loaded_partitions(ws: Workspace) -> Iterable[tuple[Path, Partition, str]]:
    for path in sorted(ws.partitions_dir.glob("*.json")):
        try:
            partition, sha = load_partition(path)
        except ArtifactError:
            continue
        yield path, partition, sha


def find_partitions(ws: Workspace, recipe: TableRecipe) -> dict[str, PartitionChoice | None]:
    """The partition each dataset of the table uses, or None where there is none yet."""
    recorded = read_manifest(ws, recipe).get("partitions", {})
    candidates: dict[str, list[PartitionChoice]] = {d.key: [] for d in recipe.datasets}
    chosen: dict[str, PartitionChoice | None] = {}
    scanned = None
    for spec in recipe.datasets:
        entry = recorded.get(spec.key)
        if isinstance(entry, dict) and (ws.partitions_dir / str(entry.get("file"))).is_file():
            path = ws.partitions_dir / str(entry["file"])
            try:
                partition, sha = load_partition(path)
            except ArtifactError:
                partition, sha = None, ""
            if partition is not None and sha == entry.get("sha256") and partition_matches(partition, spec, recipe.partition_seed):
                chosen[spec.key] = PartitionChoice(path, sha, partition.dataset)
                continue
        if scanned is None:
            scanned = list(_loaded_partitions(ws))
        for path, partition, sha in scanned:
            if partition_matches(partition, spec, recipe.partition_seed):
                candidates[spec.key].append(PartitionChoice(path, sha, partition.dataset))
        found = candidates[spec.key]
        if not found:
            chosen[spec.key] = None
        elif len(found) == 1:
            chosen[spec.key] = found[0]
        else:
            # Several (the dataset's files changed between partitions): take the one
            # with the most finished runs of this table, and say so.
            best = max(found, key=lambda c: (_finished_runs(ws, recipe, spec.key, c), c.path.stat().st_mtime))
            names = ", ".join(c.path.name for c in found)
            chosen[spec.key] = PartitionChoice(
                best.path, best.sha256, best.dataset, note=f"{len(found)} partitions match ({names}); using {best.path.name}, which has the most finished runs"
            )
    return chosen


def _finished_runs(ws: Workspace, recipe: TableRecipe, dataset: str, choice: PartitionChoice) -> int:
    return sum(cell.status == DONE for cell in cell_runs(ws, recipe, {dataset: choice}, datasets=[dataset]))


def cell_runs(
    ws: Workspace,
    recipe: TableRecipe,
    partitions: dict[str, PartitionChoice | None],
    rows: Iterable[str] | None = None,
    datasets: Iterable[str] | None = None,
) -> list[CellRun]:
    """Every selected cell and seed, in table order (dataset, row, seed), with its run's state."""
    rows = set(rows) if rows is not None else None
    datasets = set(datasets) if datasets is not None else None
    cells = []
    for spec in recipe.datasets:
        if datasets is not None and spec.key not in datasets:
            continue
        choice = partitions.get(spec.key)
        for row in recipe.rows:
            if rows is not None and row.key not in rows:
                continue
            for seed in recipe.seeds:
                settings = recipe.cell_settings(spec.key, row.key, seed)
                if choice is None:
                    cells.append(CellRun(spec.key, row.key, seed, None, MISSING, 0, settings.rounds))
                    continue
                run_id = default_run_id(settings, choice.dataset, choice.sha256)
                paths = RunPaths(ws.run_dir(run_id))
                if not paths.run_json.is_file():
                    cells.append(CellRun(spec.key, row.key, seed, run_id, MISSING, 0, settings.rounds))
                    continue
                try:
                    done = completed_rounds(paths)
                except ArtifactError:
                    done = 0
                status = DONE if done >= settings.rounds else PARTIAL
                cells.append(CellRun(spec.key, row.key, seed, run_id, status, min(done, settings.rounds), settings.rounds))
    return cells
