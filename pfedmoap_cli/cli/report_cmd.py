"""``pfedmoap report``: the run summary, or a paper table beside the paper's values."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pfedmoap_cli.artifacts.atomic import atomic_write_text
from pfedmoap_cli.report.runs import summarize_runs, to_markdown

HELP = """Summarise the runs in the workspace, or build a paper table from them.

Without --table: one row per run (markdown on stdout, reports/runs.csv).
With --table N: the table from the runs present, mean +- sample std (ddof=1)
over seeds per cell, the paper's value and the difference beside it, missing
cells marked with how many seeds they lack, and whether each seed had its
own partition or one was fixed for all; written to reports/tableN.md, .csv
and .tex, plus PNG plots when matplotlib is installed.

Examples:

  pfedmoap report

  pfedmoap report --table 1

  pfedmoap report --table demo --no-plots
"""


def _warn(line: str) -> None:
    """A run left out of the report: one line on stderr, the report goes on with the others."""
    typer.echo(line, err=True)


def _table_report(cli, table: str, plots: bool) -> None:
    from pfedmoap_cli.report import plots as plotting
    from pfedmoap_cli.report import render
    from pfedmoap_cli.report.table_recipes import load_table_recipe
    from pfedmoap_cli.report.tables import table_report

    recipe = load_table_recipe(table)
    report = table_report(cli.ws, recipe, warn=_warn)
    out = cli.ws.reports_dir
    files = {
        out / f"{recipe.stem}.md": render.to_markdown(report),
        out / f"{recipe.stem}.csv": render.to_csv(report),
        out / f"{recipe.stem}.tex": render.to_latex(report),
    }
    for path, text in files.items():
        atomic_write_text(path, text)
    typer.echo(files[out / f"{recipe.stem}.md"])
    typer.echo(f"written to {', '.join(str(p) for p in files)}")
    if not plots:
        return
    if not report.metrics:
        typer.echo("no plots: no finished runs of this table yet")
    elif not plotting.plots_available():
        typer.echo(f"no plots: {plotting.INSTALL_HINT}")
    else:
        written = plotting.write_plots(report, out)
        typer.echo(f"plots: {', '.join(str(p) for p in written)}")


def report(
    ctx: typer.Context,
    table: Annotated[
        Optional[str], typer.Option("--table", "-t", help="A paper table: 1, 2, 3, 4, demo, or a table recipe .toml.")
    ] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="With --table: also write PNG plots (needs matplotlib).")] = True,
) -> None:
    cli = ctx.obj
    if table is not None:
        _table_report(cli, table, plots)
        return
    summary = summarize_runs(cli.ws.runs_dir, warn=_warn)
    if summary.empty:
        typer.echo(f"no finished rounds in {cli.ws.runs_dir}; train a run first with 'pfedmoap train'")
        return
    summary = summary.sort_values(["dataset", "method", "seed", "run_id"]).reset_index(drop=True)
    out = cli.ws.reports_dir / "runs.csv"
    atomic_write_text(out, summary.to_csv(index=False))
    typer.echo(to_markdown(summary))
    typer.echo(f"\nwritten to {out}")
