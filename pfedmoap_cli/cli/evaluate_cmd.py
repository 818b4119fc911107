"""``pfedmoap evaluate``: re-score a run's saved checkpoints."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pfedmoap_cli import api
from pfedmoap_cli.cli.parsing import parse_key_values
from pfedmoap_cli.errors import ConfigError

HELP = """Re-score the saved checkpoints of a run into runs/<id>/evaluation.csv.

Only rounds whose checkpoints are still on disk can be re-scored: with the
default --keep-rounds auto that is the last round; train with --keep-rounds all
to re-score any round.

Examples:

  pfedmoap evaluate --run synthetic-promptfl-s1-1a2b3c4d

  pfedmoap evaluate --run synthetic-promptfl-s1-1a2b3c4d --round 4

With --dataset, the run's global part (its global prompt, or generator, ...)
is scored instead on every test image and class of another dataset
(cross-dataset generalisation), found under --data-root; client states are
private and not used, and methods without a global part are refused. The
score is added to runs/<id>/cross_dataset.csv:

  pfedmoap --data-root /data/dtd evaluate --run caltech101-promptfl-s1-1a2b3c4d --dataset dtd
"""


def evaluate(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", "-r", metavar="RUN_ID", help="Run id (a folder under runs/).")],
    round_: Annotated[Optional[int], typer.Option("--round", metavar="N", help="Only this round (default: every complete round whose checkpoints --keep-rounds kept).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda.")] = None,
    dataset: Annotated[
        Optional[str], typer.Option("--dataset", metavar="NAME", help="Score the run's global part on every class of this other dataset (default round: the last).")
    ] = None,
    option: Annotated[
        Optional[list[str]], typer.Option("--option", "-o", metavar="KEY=VALUE", help="Option of the --dataset (as for partition); repeatable.")
    ] = None,
) -> None:
    cli = ctx.obj
    if option and not dataset:
        raise ConfigError("--option sets options of the --dataset scored across datasets; add --dataset NAME or drop --option")
    if dataset:
        result = api.evaluate_on_dataset(
            run, dataset, dataset_options=parse_key_values(option or [], "--option"), workspace=cli.workspace, data_root=cli.data_root,
            round=round_, device=device, progress=cli.progress,
        )
        typer.echo(
            f"round {result.round} on {result.dataset} ({result.num_classes} classes, {result.num_examples} test images): "
            f"accuracy {100 * result.accuracy:.2f}%, {result.part} only"
        )
        typer.echo(f"written to {result.path}")
        return

    def echo(score: api.RoundScore) -> None:
        typer.echo(f"round {score.round}: mean client accuracy {100 * score.mean_accuracy:.2f}% over {score.clients} clients")

    result = api.evaluate(run, workspace=cli.workspace, data_root=cli.data_root, round=round_, device=device, progress=cli.progress, on_round=echo)
    typer.echo(f"written to {result.path}")
