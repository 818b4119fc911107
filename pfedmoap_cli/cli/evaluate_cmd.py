"""``pfedmoap evaluate``: re-score a run's saved checkpoints."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pfedmoap_cli import api

HELP = """Re-score the saved checkpoints of a run into runs/<id>/evaluation.csv.

Only rounds whose checkpoints are still on disk can be re-scored: with the
default --keep-rounds auto that is the last round; train with --keep-rounds all
to re-score any round.

Examples:

  pfedmoap evaluate --run synthetic-promptfl-s1-1a2b3c4d

  pfedmoap evaluate --run synthetic-promptfl-s1-1a2b3c4d --round 4
"""


def evaluate(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", "-r", metavar="RUN_ID", help="Run id (a folder under runs/).")],
    round_: Annotated[Optional[int], typer.Option("--round", metavar="N", help="Only this round (default: every complete round whose checkpoints --keep-rounds kept).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda.")] = None,
) -> None:
    cli = ctx.obj

    def echo(score: api.RoundScore) -> None:
        typer.echo(f"round {score.round}: mean client accuracy {100 * score.mean_accuracy:.2f}% over {score.clients} clients")

    result = api.evaluate(run, workspace=cli.workspace, data_root=cli.data_root, round=round_, device=device, progress=cli.progress, on_round=echo)
    typer.echo(f"written to {result.path}")
