"""Which run holds each cell of a paper table, and how far it got.

A cell (dataset, row, seed) is identified by its run id,
``default_run_id(settings, dataset, partition sha256)``: the same id that
``pfedmoap train`` gives a run with those settings on that partition. The
partition of a (dataset entry, seed) is the one built with the table's
partition seed for that run seed (the run seed itself by default, or the fixed
``[table] partition_seed``): ``pfedmoap sweep`` builds it and records it in
``sweeps/<table>.json``; without that record (or when its file is gone) it is
found among ``partitions/*.json`` by its dataset, scheme, parameters and seed.

``sweeps/<table>.json`` (schema ``pfedmoap.sweep/2``)::

    {"schema": "pfedmoap.sweep/2", "table": "1", "partition_seed": "run" | N,
     "partitions": {"<dataset key>": {"<partition seed>": {"file": ..., "sha256": ..., "partition_seed": N}}}, ...}

Schema ``pfedmoap.sweep/1`` (one partition per dataset key,
``{"<dataset key>": {"file", "sha256", "partition_seed"}}``) is still read.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from pfedmoap_cli.artifacts.atomic import atomic_write_text, sha256_file
from pfedmoap_cli.artifacts.partition import Partition, load_partition
from pfedmoap_cli.engine.run_record import completed_rounds
from pfedmoap_cli.engine.settings import default_run_id
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import ArtifactError
from pfedmoap_cli.report.table_recipes import PARTITION_SEED_RUN, DatasetSpec, TableRecipe

SWEEP_SCHEMA = "pfedmoap.sweep/2"
SWEEP_SCHEMA_V1 = "pfedmoap.sweep/1"  # one partition per dataset key; read, never written

DONE, PARTIAL, MISSING = "done", "partial", "missing"


@dataclass(frozen=True)
class PartitionChoice:
    """The partition a table uses for one dataset entry and partition seed."""

    path: Path
    sha256: str
    dataset: str
    seed: int  # the partition seed it was built with
    note: str = ""


#: The partitions of a table: (dataset key, partition seed) -> its partition, None where none exists yet.
#: A cell of seed s uses the entry of ``recipe.partition_seed_for(s)``.
TablePartitions = dict[tuple[str, int], PartitionChoice | None]


@dataclass(frozen=True)
class CellRun:
    """One (dataset, row, seed) of a table and the state of its run."""

    dataset: str
    row: str
    seed: int
    run_id: str | None  # None: the partition of its dataset and seed does not exist yet
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
    """The sweep record of a table, either schema (empty when there is none or it is unreadable)."""
    path = manifest_path(ws, recipe)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) and data.get("schema") in (SWEEP_SCHEMA, SWEEP_SCHEMA_V1) else {}


def recorded_partitions(record: Mapping[str, Any]) -> dict[tuple[str, int], dict]:
    """The record's partition entries by (dataset key, partition seed), from either schema.

    Malformed entries are left out: the partition is then looked for among the
    workspace's partition files, as without a record.
    """
    entries: dict[tuple[str, int], dict] = {}
    raw = record.get("partitions", {})
    if not isinstance(raw, dict):
        return entries
    for key, value in raw.items():
        if not isinstance(value, dict):
            continue
        if record.get("schema") == SWEEP_SCHEMA_V1:
            # /1 held one partition per dataset key; its seed is in the entry (or the record).
            seed = value.get("partition_seed", record.get("partition_seed"))
            per_seed = {seed: value} if isinstance(seed, int) and not isinstance(seed, bool) else {}
        else:
            per_seed = {int(s): entry for s, entry in value.items() if s.lstrip("-").isdigit()}
        for seed, entry in per_seed.items():
            if isinstance(entry, dict):
                entries[(key, int(seed))] = entry
    return entries


def record_partitions(ws: Workspace, recipe: TableRecipe, chosen: Mapping[tuple[str, int], PartitionChoice]) -> Path:
    """Write ``sweeps/<table>.json`` (schema /2): the partition (file, sha256, seed) of each dataset entry and partition seed.

    Entries of other seeds already recorded are kept (a table switched between
    fixed and per-seed partitions finds its earlier partitions again).
    """
    entries = recorded_partitions(read_manifest(ws, recipe))
    for (key, seed), choice in chosen.items():
        entries[(key, seed)] = {"file": choice.path.name, "sha256": choice.sha256, "partition_seed": seed}
    partitions: dict[str, dict[str, dict]] = {}
    for (key, seed), entry in sorted(entries.items()):
        partitions.setdefault(key, {})[str(seed)] = entry
    record = {
        "schema": SWEEP_SCHEMA,
        "table": recipe.name,
        "recipe": str(recipe.path),
        "recipe_sha256": sha256_file(recipe.path),
        "partition_seed": PARTITION_SEED_RUN if recipe.partition_seed is None else recipe.partition_seed,
        "partitions": partitions,
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = manifest_path(ws, recipe)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def partition_matches(partition: Partition, spec: DatasetSpec, partition_seed: int) -> bool:
    """Whether ``partition`` was made with the table's settings for ``spec`` and seed ``partition_seed``.

    The base-to-novel option is compared on its own: a base-to-novel partition
    and a plain one with the same scheme, clients and seed are different
    partitions (the base-to-novel one also records its ``base_classes``, which
    depends on the dataset, not on the recipe).
    """
    if bool(partition.params.get("base_to_novel", False)) != spec.partition.base_to_novel:
        return False
    expected = spec.partition.settings(partition_seed).params()
    expected.pop("base_to_novel", None)  # compared above (params() records it only when true)
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


def _recorded_choice(ws: Workspace, entry: Any, spec: DatasetSpec, seed: int) -> PartitionChoice | None:
    """The recorded partition of ``spec`` and ``seed`` when its file is there, intact and still matches the recipe."""
    if not isinstance(entry, dict) or not (ws.partitions_dir / str(entry.get("file"))).is_file():
        return None
    path = ws.partitions_dir / str(entry["file"])
    try:
        partition, sha = load_partition(path)
    except ArtifactError:
        return None
    if sha != entry.get("sha256") or not partition_matches(partition, spec, seed):
        return None
    return PartitionChoice(path, sha, partition.dataset, seed)


def find_partitions(ws: Workspace, recipe: TableRecipe) -> TablePartitions:
    """The partition of each dataset entry and partition seed of the table, or None where there is none yet."""
    recorded = recorded_partitions(read_manifest(ws, recipe))
    chosen: TablePartitions = {}
    scanned = None
    for spec in recipe.datasets:
        for seed in recipe.partition_seeds():
            choice = _recorded_choice(ws, recorded.get((spec.key, seed)), spec, seed)
            if choice is not None:
                chosen[(spec.key, seed)] = choice
                continue
            if scanned is None:
                scanned = list(_loaded_partitions(ws))
            found = [PartitionChoice(path, sha, p.dataset, seed) for path, p, sha in scanned if partition_matches(p, spec, seed)]
            if not found:
                chosen[(spec.key, seed)] = None
            elif len(found) == 1:
                chosen[(spec.key, seed)] = found[0]
            else:
                # Several (the dataset's files changed between partitions): take the one
                # with the most finished runs of this table, and say so.
                best = max(found, key=lambda c: (_finished_runs(ws, recipe, spec.key, c), c.path.stat().st_mtime))
                names = ", ".join(c.path.name for c in found)
                chosen[(spec.key, seed)] = PartitionChoice(
                    best.path, best.sha256, best.dataset, seed,
                    note=f"{len(found)} partitions match ({names}); using {best.path.name}, which has the most finished runs",
                )
    return chosen


def _finished_runs(ws: Workspace, recipe: TableRecipe, dataset: str, choice: PartitionChoice) -> int:
    """Finished runs of the table on ``choice`` (the seeds that use its partition seed)."""
    cells = cell_runs(ws, recipe, {(dataset, choice.seed): choice}, datasets=[dataset])
    return sum(cell.status == DONE for cell in cells)


def cell_runs(
    ws: Workspace,
    recipe: TableRecipe,
    partitions: Mapping[tuple[str, int], PartitionChoice | None],
    rows: Iterable[str] | None = None,
    datasets: Iterable[str] | None = None,
) -> list[CellRun]:
    """Every selected cell and seed, in table order (dataset, row, seed), with its run's state.

    A cell of seed ``s`` is looked for on the partition of
    ``(dataset key, recipe.partition_seed_for(s))`` in ``partitions``.
    """
    rows = set(rows) if rows is not None else None
    datasets = set(datasets) if datasets is not None else None
    cells = []
    for spec in recipe.datasets:
        if datasets is not None and spec.key not in datasets:
            continue
        for row in recipe.rows:
            if rows is not None and row.key not in rows:
                continue
            for seed in recipe.seeds:
                settings = recipe.cell_settings(spec.key, row.key, seed)
                choice = partitions.get((spec.key, recipe.partition_seed_for(seed)))
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
