"""``pfedmoap report``: tables derived from the runs' metrics."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pfedmoap_cli.artifacts.atomic import atomic_write_text
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.report.runs import summarize_runs, to_markdown

HELP = """Summarise the runs in the workspace (markdown on stdout, CSV in reports/).

Examples:

  pfedmoap report
"""


def report(
    ctx: typer.Context,
    table: Annotated[Optional[str], typer.Option("--table", help="A paper table (not yet available in this version).")] = None,
) -> None:
    cli = ctx.obj
    if table is not None:
        raise ConfigError("paper tables (--table) are not available in this version yet; run 'pfedmoap report' for the run summary")
    summary = summarize_runs(cli.ws.runs_dir)
    if summary.empty:
        typer.echo(f"no finished rounds in {cli.ws.runs_dir}; train a run first with 'pfedmoap train'")
        return
    summary = summary.sort_values(["dataset", "method", "seed", "run_id"]).reset_index(drop=True)
    out = cli.ws.reports_dir / "runs.csv"
    atomic_write_text(out, summary.to_csv(index=False))
    typer.echo(to_markdown(summary))
    typer.echo(f"\nwritten to {out}")
