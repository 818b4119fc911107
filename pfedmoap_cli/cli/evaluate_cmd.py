"""``pfedmoap evaluate``: re-score a run's saved checkpoints."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pfedmoap_cli.artifacts.metrics import format_metric_rows, write_metrics_text
from pfedmoap_cli.artifacts.partition import load_partition
from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.run_record import completed_rounds, partition_path_of, read_run_record, run_settings
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.workspace import RunPaths, check_run_id
from pfedmoap_cli.errors import ArtifactError, ConfigError

HELP = """Re-score the saved checkpoints of a run into runs/<id>/evaluation.csv.

Examples:

  pfedmoap evaluate --run synthetic-promptfl-s1-1a2b3c4d

  pfedmoap evaluate --run synthetic-promptfl-s1-1a2b3c4d --round 4
"""


def evaluate(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", "-r", help="Run id (a folder under runs/).")],
    round_: Annotated[Optional[int], typer.Option("--round", help="Only this round (default: every complete round).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")] = None,
) -> None:
    cli = ctx.obj
    check_run_id(run, "--run")
    paths = RunPaths(cli.ws.run_dir(run))
    record = read_run_record(paths)
    settings = run_settings(record)
    if device:
        import dataclasses

        settings = dataclasses.replace(settings, device=device)
    if paths.clients_on_nodes.is_file():
        raise ArtifactError(
            f"run {run} was trained on Flower SuperNodes and its client states are on them, not here; "
            "it cannot be re-scored from this workspace"
        )
    done = completed_rounds(paths, settings.rounds)
    if done == 0:
        raise ArtifactError(f"run {run} has no complete round yet; train it first ('pfedmoap train --resume --run-id {run}')")
    rounds = list(range(done)) if round_ is None else [round_]
    if any(r < 0 or r >= done for r in rounds):
        raise ConfigError(f"--round must be between 0 and {done - 1} for run {run}")
    partition_path = partition_path_of(record, cli.ws.root)
    partition, sha = load_partition(partition_path)
    if sha != record["partition_sha256"]:
        raise ArtifactError(f"partition {partition_path} changed since run {run} was trained; it cannot be re-scored")
    session = open_session(settings, partition, sha, cli.data_root, cli.ws.features_cache_dir, progress=cli.progress)
    federation = Federation(session, run, paths, progress=cli.progress)
    # Every round is scored (its files verified first) before anything is
    # written, and the file is replaced whole: a failed evaluate leaves the
    # previous evaluation.csv as it was.
    body = []
    for r in rounds:
        rows = federation.reevaluate(r)
        body.append(format_metric_rows(rows))
        accuracies = [row.value for row in rows if row.metric == "accuracy"]
        typer.echo(f"round {r}: mean client accuracy {100 * sum(accuracies) / len(accuracies):.2f}% over {len(accuracies)} clients")
    write_metrics_text(paths.evaluation_csv, "".join(body))
    typer.echo(f"written to {paths.evaluation_csv}")
