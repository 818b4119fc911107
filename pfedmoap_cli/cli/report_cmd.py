"""``pfedmoap report``: the run summary, or a paper table beside the paper's values."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pfedmoap_cli import api

HELP = """Summarise the runs in the workspace, or build a paper table from them.

Without --table: one row per run (markdown on stdout, reports/runs.csv).
Runs of a --base-to-novel partition add local_acc, base_acc, novel_acc, hm
(harmonic mean of base and novel) and hm3 (of local, base and novel). Scores
of runs on other datasets ('pfedmoap evaluate --dataset') follow in a second
table (reports/cross_dataset.csv), each of the run's global part only.
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


def report(
    ctx: typer.Context,
    table: Annotated[
        Optional[str], typer.Option("--table", "-t", metavar="TABLE", help="A paper table: 1, 2, 3, 4, demo, or a table recipe .toml.")
    ] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="With --table: also write PNG plots (needs matplotlib).")] = True,
) -> None:
    cli = ctx.obj
    result = api.report(workspace=cli.workspace, table=table, plots=plots, warn=_warn)
    if table is not None:
        typer.echo(result.markdown)
        typer.echo(f"written to {', '.join(str(p) for p in result.files)}")
        if result.plot_note is not None:
            typer.echo(f"no plots: {result.plot_note}")
        elif plots:
            typer.echo(f"plots: {', '.join(str(p) for p in result.plots)}")
        return
    if result.frame.empty:
        typer.echo(f"no finished rounds in {cli.ws.runs_dir}; train a run first with 'pfedmoap train'")
        return
    typer.echo(result.markdown)
    if "hm" in result.frame.columns:
        typer.echo("\nbase-to-novel runs: local = mean client test accuracy, base / novel = mean over clients on all base / novel "
                   "test images; hm = harmonic mean of base and novel, hm3 = of local, base and novel")
    typer.echo(f"\nwritten to {', '.join(str(path) for path in result.files)}")
