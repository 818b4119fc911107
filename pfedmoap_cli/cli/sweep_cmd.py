"""``pfedmoap sweep``: run every missing cell of a paper table."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Optional

import typer

from pfedmoap_cli.report.cells import DONE, MISSING, PARTIAL, CellRun, TablePartitions, find_partitions, manifest_path
from pfedmoap_cli.report.sweep import (
    Selection,
    build_partitions,
    check_runnable,
    plan,
    run_cells,
    select,
    selected_datasets,
    unavailable,
)
from pfedmoap_cli.report.table_recipes import TableRecipe, load_table_recipe
from pfedmoap_cli.cli.train_cmd import Engine, make_runtime
from pfedmoap_cli.tracking.registry import make_trackers

HELP = """Run every cell (dataset x method x seed) of a paper table that is not finished yet.

Partitions are created as the table's recipe says: one per dataset and
seed, built with that seed, unless its [table] partition_seed fixes one for
all seeds; they are recorded in the workspace's sweeps/<table>.json. Finished
runs are skipped and interrupted ones resume from their last complete round,
so the same command continues a sweep after a stop. Tables: 1, 2, 3, 4,
baselines, demo, generalisation, generalisation_synthetic, or the path of a
table recipe (.toml).

Examples:

  pfedmoap sweep --table demo

  pfedmoap sweep --table 1 --dry-run

  pfedmoap sweep --table 1 --only flowers102 --only pfedmoap --device cuda
"""


def _counts(cells: list[CellRun]) -> str:
    counts = Counter(c.status for c in cells)
    return f"{counts[DONE]} done, {counts[PARTIAL]} partial, {counts[MISSING]} missing"


def partition_lines(recipe: TableRecipe, partitions: TablePartitions, selection: Selection) -> list[str]:
    """The selected datasets' partitions (one per seed when per-seed), each with its file or that it is not created yet."""
    lines = []
    for spec in selected_datasets(recipe, selection):
        for seed in recipe.partition_seeds():
            choice = partitions.get((spec.key, seed))
            where = choice.path.name if choice is not None else "not created yet"
            lines.append(f"partition of {spec.key}, seed {seed}: {where}")
    return lines


def _listing(cells: list[CellRun], blocked_methods: set[str], method_of: dict[str, str]) -> list[str]:
    width_ds = max(len("dataset"), *(len(c.dataset) for c in cells))
    width_row = max(len("row"), *(len(c.row) for c in cells))
    lines = [f"{'status':<24} {'dataset':<{width_ds}} {'row':<{width_row}} {'seed':>4}  run"]
    for cell in cells:
        run = cell.run_id or "(partition not created yet)"
        if method_of[cell.row] in blocked_methods:
            run += f"  [method {method_of[cell.row]} not available]"
        lines.append(f"{cell.describe():<24} {cell.dataset:<{width_ds}} {cell.row:<{width_row}} {cell.seed:>4}  {run}")
    return lines


def sweep(
    ctx: typer.Context,
    table: Annotated[str, typer.Option("--table", "-t", metavar="TABLE", help="Table: 1, 2, 3, 4, demo, or a table recipe .toml.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells with their state (done/partial/missing); run nothing.")] = False,
    only: Annotated[
        Optional[list[str]], typer.Option("--only", metavar="KEY", help="Keep only this dataset, method or row key; repeatable.")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda (does not change run ids).")] = None,
    engine: Annotated[
        Engine, typer.Option("--engine", help="Where each run's rounds run: 'local' or 'flower' (Flower's simulation runtime; same run ids).")
    ] = Engine.LOCAL,
    round_timeout: Annotated[
        Optional[float], typer.Option("--round-timeout", metavar="SECONDS", help="Flower: wait this long for the nodes' replies per step.")
    ] = None,
    report_to: Annotated[
        Optional[list[str]],
        typer.Option("--report-to", metavar="TRACKER", help="Log each run's rounds to tensorboard, mlflow or wandb (repeatable or comma-separated; same run ids)."),
    ] = None,
) -> None:
    cli = ctx.obj
    ws = cli.ws
    recipe = load_table_recipe(table)
    selection = select(recipe, only)
    method_of = {r.key: r.method for r in recipe.rows}
    if dry_run:
        partitions = find_partitions(ws, recipe)
        cells = plan(ws, recipe, selection, partitions)
        blocked_methods, blocked_datasets = unavailable(recipe, selection)
        typer.echo(f"table {recipe.name}: {recipe.title}")
        typer.echo(f"  {len(cells)} runs: {_counts(cells)} (seeds {', '.join(map(str, recipe.seeds))}; {recipe.partition_mode()})")
        if blocked_methods or blocked_datasets:
            typer.echo(f"  not available in this version: {', '.join(blocked_methods + blocked_datasets)} (the sweep refuses them)")
        for line in partition_lines(recipe, partitions, selection):
            typer.echo(f"  {line}")
        typer.echo("")
        for line in _listing(cells, set(blocked_methods), method_of):
            typer.echo(line)
        return
    # Every check (settings of every cell with --device, engine flags) before the
    # first partition or sweep record is written: a refused sweep creates nothing.
    check_runnable(recipe, selection, device)
    runtime = make_runtime(engine, round_timeout)
    trackers = make_trackers(report_to)
    datasets = [d.key for d in recipe.datasets if selection.datasets is None or d.key in selection.datasets]
    partitions = build_partitions(ws, cli.data_root, recipe, datasets)
    cells = plan(ws, recipe, selection, partitions)
    todo = [c for c in cells if c.status != DONE]
    typer.echo(
        f"table {recipe.name}: {len(cells)} runs, {_counts(cells)}; {recipe.partition_mode()}, recorded in {manifest_path(ws, recipe)}"
    )

    def finished(cell: CellRun, outcome) -> None:
        if not cli.progress:
            typer.echo(f"  {cell.dataset} {cell.row} seed {cell.seed}: {outcome.run_id} {outcome.completed_rounds}/{outcome.total_rounds} rounds")

    busy: list[CellRun] = []

    def in_use(cell: CellRun, error) -> None:
        busy.append(cell)
        typer.echo(f"  skipped {cell.dataset} {cell.row} seed {cell.seed}: {error}", err=True)

    try:
        run_cells(
            ws, cli.data_root, recipe, cells, partitions, progress=cli.progress, device=device, on_done=finished, on_busy=in_use, runtime=runtime,
            observers=trackers,
        )
    except KeyboardInterrupt:
        typer.echo(f"interrupted; finished runs and completed rounds are saved, continue with 'pfedmoap sweep --table {table}'", err=True)
        raise typer.Exit(130) from None
    if not todo:
        typer.echo("nothing to run: every selected run is finished")
    if busy:
        typer.echo(
            f"{len(busy)} run(s) were being trained by another process and were left to it; "
            f"'pfedmoap sweep --table {table} --dry-run' shows when every cell is done"
        )
    typer.echo(f"see the table with 'pfedmoap report --table {recipe.name}'")

