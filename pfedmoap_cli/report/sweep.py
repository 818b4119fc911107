"""Fill a paper table: build its partitions, then run every cell and seed not finished yet.

Partitions: one per (dataset entry, seed), built with that seed, unless the
recipe fixes ``[table] partition_seed`` (then one per entry for all seeds).

Runs go through :func:`pfedmoap_cli.engine.runner.execute_run` with
``IfExists.AUTO`` and their default run ids, so a finished run is skipped, an
interrupted one resumes from its last complete round (ending with the same
numbers as an unbroken run), and ``pfedmoap report --table`` finds them all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from pfedmoap_cli.artifacts.partition import Partition, check_no_empty_clients, save_partition
from pfedmoap_cli.artifacts.run_lock import RunInUse
from pfedmoap_cli.data.build_partition import build_partition
from pfedmoap_cli.data.sources import DatasetSource, dataset_names, open_dataset
from pfedmoap_cli.engine.runner import IfExists, RunObserver, RunOutcome, Runtime, execute_run
from pfedmoap_cli.engine.session import method_options
from pfedmoap_cli.engine.settings import validate_settings
from pfedmoap_cli.engine.workspace import Workspace
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.methods.base import get_method, method_names
from pfedmoap_cli.report.cells import DONE, CellRun, PartitionChoice, TablePartitions, cell_runs, partition_matches, record_partitions
from pfedmoap_cli.report.table_recipes import DatasetSpec, TableRecipe


@dataclass(frozen=True)
class Selection:
    """The rows and datasets ``--only`` keeps (None: all)."""

    rows: frozenset[str] | None = None
    datasets: frozenset[str] | None = None


def select(recipe: TableRecipe, only: Iterable[str] | None) -> Selection:
    """Interpret ``--only`` values: dataset keys or names, row keys or method names.

    A dataset name selects every entry of that dataset. Values of one kind are
    alternatives; datasets and rows combine (a cell is kept when its dataset
    entry and its row are both kept).
    """
    rows: set[str] = set()
    datasets: set[str] = set()
    for value in only or []:
        hit = False
        entries = [d.key for d in recipe.datasets if value in (d.key, d.name)]
        if entries:
            datasets.update(entries)
            hit = True
        matching = [r.key for r in recipe.rows if r.key == value or r.method == value]
        if matching:
            rows.update(matching)
            hit = True
        if not hit:
            raise ConfigError(
                f"--only {value} matches no dataset, row or method of table {recipe.name}; choose from datasets "
                f"{', '.join(d.key for d in recipe.datasets)} or rows {', '.join(r.key for r in recipe.rows)}"
            )
    return Selection(frozenset(rows) if rows else None, frozenset(datasets) if datasets else None)


def selected_rows(recipe: TableRecipe, selection: Selection):
    return [r for r in recipe.rows if selection.rows is None or r.key in selection.rows]


def selected_datasets(recipe: TableRecipe, selection: Selection):
    return [d for d in recipe.datasets if selection.datasets is None or d.key in selection.datasets]


def unavailable(recipe: TableRecipe, selection: Selection) -> tuple[list[str], list[str]]:
    """Methods and datasets the selection needs that this installation does not have."""
    methods = sorted({r.method for r in selected_rows(recipe, selection)} - set(method_names()))
    datasets = sorted({d.name for d in selected_datasets(recipe, selection)} - set(dataset_names()))
    return methods, datasets


def check_runnable(recipe: TableRecipe, selection: Selection, device: str | None = None) -> None:
    """Refuse, before anything is written, a selection that cannot run.

    An unknown method or dataset, bad method options, any cell's settings out
    of range (``device`` applied, as the sweep will run them), or a pFedMoAP
    K larger than the dataset entry's federation can supply. Nothing is
    created by this check, so a refused sweep leaves the workspace as it was.
    """
    methods, datasets = unavailable(recipe, selection)
    if methods:
        available = [r.key for r in selected_rows(recipe, selection) if r.method not in methods]
        hint = f"; run the rest with --only ({', '.join(available)})" if available else ""
        raise ConfigError(
            f"table {recipe.name} needs method(s) {', '.join(methods)}, not available in this version "
            f"(registered: {', '.join(method_names())}){hint}"
        )
    if datasets:
        raise ConfigError(
            f"table {recipe.name} needs dataset(s) {', '.join(datasets)}, not available in this version "
            f"(registered: {', '.join(dataset_names())}); leave them out with --only"
        )
    for spec in selected_datasets(recipe, selection):
        for row in selected_rows(recipe, selection):
            for seed in recipe.seeds:
                settings = recipe.cell_settings(spec.key, row.key, seed)
                if device is not None:
                    settings = replace(settings, device=device)
                validate_settings(settings)
                method_options(get_method(settings.method), settings.method_options)
                _check_experts(recipe, spec, settings)


def _check_experts(recipe: TableRecipe, spec: DatasetSpec, settings) -> None:
    """A table row's pFedMoAP K must fit the dataset entry's number of clients (the recipe's fix, not a flag's)."""
    if settings.method != "pfedmoap" or "num_experts" not in settings.method_options:
        return
    clients = spec.partition.clients
    if clients is not None and int(settings.method_options["num_experts"]) > int(clients) - 1:
        raise ConfigError(
            f"table recipe {recipe.path} gives {spec.key} num_experts={settings.method_options['num_experts']} but its "
            f"partition has {clients} clients, so at most {int(clients) - 1} experts; lower num_experts in the recipe"
        )


def build_partitions(ws: Workspace, data_root: Path, recipe: TableRecipe, datasets: Iterable[str]) -> TablePartitions:
    """Create (or find again: same data, same file) the partitions of each dataset entry (by key) and record them.

    One partition per (entry, partition seed): per run seed when the table's
    partitions follow the seed, a single one when ``partition_seed`` fixes it.
    Every dataset is opened and every partition built and checked before the
    first file is written, so a missing dataset or a recipe that does not
    fit leaves no partition or sweep record behind.
    """
    built: dict[tuple[str, int], Partition] = {}
    for key in datasets:
        spec = recipe.dataset(key)
        source = open_dataset(spec.name, Path(data_root), **dict(spec.partition.dataset_options))
        for seed in recipe.partition_seeds():
            built[(key, seed)] = _build_one(recipe, spec, source, seed)
    chosen: TablePartitions = {}
    for (key, seed), partition in built.items():
        path, sha = save_partition(partition, ws.partitions_dir, make_current=False)
        chosen[(key, seed)] = PartitionChoice(path, sha, partition.dataset, seed)
    record_partitions(ws, recipe, chosen)
    return chosen


def _build_one(recipe: TableRecipe, spec: DatasetSpec, source: DatasetSource, seed: int) -> Partition:
    """Build the partition of ``spec`` with partition seed ``seed`` and check it against the recipe (nothing is written)."""
    options = dict(spec.partition.dataset_options)
    partition = build_partition(source, spec.partition.settings(seed), options)
    if recipe.per_domain:
        got = list(dict.fromkeys(c.domain for c in partition.clients))
        if got != list(spec.domains):
            raise ConfigError(
                f"dataset {spec.name} has domains {', '.join(map(str, got))} but table recipe {recipe.path} lists "
                f"{', '.join(spec.domains)}; fix the recipe's domains"
            )
    if not partition_matches(partition, spec, seed):
        got = ", base-to-novel" if partition.params.get("base_to_novel") else ""
        asked = ", base-to-novel" if spec.partition.base_to_novel else ""
        raise ConfigError(
            f"the {spec.name} partition came out with {partition.num_clients} clients ({partition.scheme}{got}), "
            f"not the {spec.partition.clients}{asked} that table recipe {recipe.path} asks for; fix its partition settings"
        )
    check_no_empty_clients(partition, "fix the table recipe's partition settings")
    return partition


def run_cells(
    ws: Workspace,
    data_root: Path,
    recipe: TableRecipe,
    cells: list[CellRun],
    partitions: TablePartitions,
    progress: bool = True,
    device: str | None = None,
    on_done: Callable[[CellRun, RunOutcome], None] | None = None,
    on_busy: Callable[[CellRun, RunInUse], None] | None = None,
    runtime: Runtime | None = None,
    observers: Sequence[RunObserver] = (),
) -> list[RunOutcome]:
    """Run every cell that is not done (partial ones resume); a tqdm bar counts all of them.

    ``observers`` (experiment trackers, ``--report-to``) follow every run.

    Each cell runs on the partition of its dataset entry and partition seed
    (``recipe.partition_seed_for(seed)``). A cell whose run another process is
    training (its lock is held) is skipped and reported through ``on_busy``,
    so several sweeps can share a workspace and split its cells between them.
    """
    from tqdm.auto import tqdm

    todo = [c for c in cells if c.status != DONE]
    outcomes = []
    with tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"table {recipe.name}", unit="run", disable=not progress) as bar:
        for cell in todo:
            bar.set_postfix_str(f"{cell.dataset} {cell.row} s{cell.seed}")
            settings = recipe.cell_settings(cell.dataset, cell.row, cell.seed)
            if device is not None:
                settings = validate_settings(replace(settings, device=device))
            partition = partitions[(cell.dataset, recipe.partition_seed_for(cell.seed))]
            try:
                outcome = execute_run(
                    ws, data_root, settings, partition.path, run_id=None, if_exists=IfExists.AUTO, progress=progress, runtime=runtime,
                    observers=observers,
                )
            except RunInUse as busy:
                # Another sweep (maybe on another machine sharing the workspace) is
                # training this cell: leave it to that one and go on with the rest.
                if on_busy is not None:
                    on_busy(cell, busy)
                continue
            if cell.run_id is not None and outcome.run_id != cell.run_id:  # pragma: no cover - a bug, not a user error
                raise RuntimeError(f"run id {outcome.run_id} differs from the expected {cell.run_id}")
            outcomes.append(outcome)
            bar.update(1)
            if on_done is not None:
                on_done(cell, outcome)
    return outcomes


def plan(ws: Workspace, recipe: TableRecipe, selection: Selection, partitions: TablePartitions) -> list[CellRun]:
    """The selected cells with their run states."""
    return cell_runs(
        ws,
        recipe,
        partitions,
        rows=None if selection.rows is None else selection.rows,
        datasets=None if selection.datasets is None else selection.datasets,
    )
