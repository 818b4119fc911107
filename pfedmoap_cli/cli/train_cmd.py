"""``pfedmoap train``: run (or resume) a federation on a partition."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pfedmoap_cli.artifacts.partition import load_partition, resolve_partition_path
from pfedmoap_cli.cli.parsing import parse_key_values
from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.run_record import completed_rounds, read_run_record, run_settings, write_run_record
from pfedmoap_cli.engine.session import open_session
from pfedmoap_cli.engine.settings import TrainSettings, default_run_id, merge_settings, validate_settings
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.errors import ArtifactError, ConfigError
from pfedmoap_cli.recipes import load_recipe, read_toml

HELP = """Train a federation on the current (or a named) partition.

Settings come from the defaults, the dataset's recipe, --config FILE (TOML,
keys as in run.json's settings, optionally under [train]), then flags.

Examples:

  pfedmoap train --method promptfl --rounds 2 --local-epochs 1

  pfedmoap train --config my-run.toml --seed 2

  pfedmoap train --method promptfl --rounds 2 --local-epochs 1 --resume
"""


def resolve_settings(dataset: str, config: Path | None, flags: dict[str, Any]) -> TrainSettings:
    """Defaults < recipe [train] < config file < flags, validated."""
    settings = merge_settings(TrainSettings(), load_recipe(dataset).get("train", {}), f"the {dataset} recipe")
    if config is not None:
        data = read_toml(config, "config file")
        settings = merge_settings(settings, data.get("train", data), f"config file {config}")
    return validate_settings(merge_settings(settings, flags, "the command line"))


def train(
    ctx: typer.Context,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Method name (zsclip, coop, promptfl, ...).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Communication rounds.")] = None,
    local_epochs: Annotated[Optional[int], typer.Option("--local-epochs", help="Local epochs per round.")] = None,
    frac: Annotated[Optional[float], typer.Option("--frac", help="Fraction of clients sampled per round, in (0, 1].")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Training batch size.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Experiment seed (0 is honoured).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Prompt learning rate.")] = None,
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", help="Number of learnable context tokens.")] = None,
    ctx_init: Annotated[Optional[str], typer.Option("--ctx-init", help="Initialise the context from a phrase, e.g. 'a photo of a'.")] = None,
    backbone: Annotated[Optional[str], typer.Option("--backbone", help="open_clip model name (RN50, ViT-B-16, tiny-vit, ...).")] = None,
    pretrained: Annotated[
        Optional[str], typer.Option("--pretrained", help="open_clip pretrained tag, a local checkpoint path, or 'none'.")
    ] = None,
    backbone_seed: Annotated[Optional[int], typer.Option("--backbone-seed", help="Init seed of a randomly initialised backbone.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast for the frozen encoders on GPU.")] = None,
    truncate_prompts: Annotated[
        Optional[bool], typer.Option("--truncate/--no-truncate", help="Run the text encoder only up to the last EOT token (exact).")
    ] = None,
    eval_batch_size: Annotated[Optional[int], typer.Option("--eval-batch-size", help="Batch size for evaluation and features.")] = None,
    method_option: Annotated[
        Optional[list[str]], typer.Option("--method-option", help="Method-specific KEY=VALUE; repeatable.")
    ] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file of settings.")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", help="Partition file or name (default: the current one).")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="Name of the run (default: derived from its settings).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last complete round.")] = False,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", hidden=True, help="Stop after this many rounds (testing).")] = None,
) -> None:
    cli = ctx.obj
    ws = cli.ws
    flags = dict(
        method=method, rounds=rounds, local_epochs=local_epochs, frac=frac, batch_size=batch_size, seed=seed, lr=lr,
        n_ctx=n_ctx, ctx_init=ctx_init, backbone=backbone, pretrained=pretrained, backbone_seed=backbone_seed,
        device=device, amp=amp, truncate_prompts=truncate_prompts, eval_batch_size=eval_batch_size,
        method_options=parse_key_values(method_option, "--method-option") if method_option else None,
    )
    if resume and run_id:
        paths = RunPaths(ws.run_dir(run_id))
        record = read_run_record(paths)
        given = sorted(k for k, v in flags.items() if v is not None and k not in {"device", "eval_batch_size"})
        if given or config:
            raise ConfigError(f"--resume --run-id takes its settings from the run; drop {', '.join('--' + g.replace('_', '-') for g in given) or '--config'}")
        settings = run_settings(record)
        settings = validate_settings(merge_settings(settings, {"device": device, "eval_batch_size": eval_batch_size}, "the command line"))
        partition_path = Path(record["partition_file"])
    else:
        partition_path = resolve_partition_path(ws.partitions_dir, partition)
    part, part_sha = load_partition(partition_path)
    if resume and run_id:
        if part_sha != record["partition_sha256"]:
            raise ArtifactError(f"partition {partition_path} changed since run {run_id} started; it cannot be resumed")
    else:
        settings = resolve_settings(part.dataset, config, flags)
        run_id = run_id or default_run_id(settings, part.dataset, part_sha)
        paths = RunPaths(ws.run_dir(run_id))
        done = completed_rounds(paths) if paths.run_json.is_file() else 0
        if resume and not paths.run_json.is_file():
            raise ArtifactError(f"no run {run_id} to resume (no run matches these settings); start it without --resume")
        if not resume and paths.run_json.is_file():
            raise ArtifactError(
                f"run {run_id} already exists ({done}/{settings.rounds} rounds); pass --resume to continue it or --run-id NAME for a new run"
            )
    if completed_rounds(paths) >= settings.rounds:
        typer.echo(f"run {run_id} is already complete ({settings.rounds} rounds); see 'pfedmoap report'")
        return
    session = open_session(settings, part, part_sha, cli.data_root, ws.features_cache_dir, progress=cli.progress)
    if not paths.run_json.is_file():
        write_run_record(paths, run_id, settings, part.dataset, partition_path.resolve(), part_sha)
    federation = Federation(session, run_id, paths, progress=cli.progress)
    last: list = []
    finished = federation.run(stop_after=stop_after, on_round=last.append)
    typer.echo(f"run {run_id}: {finished}/{settings.rounds} rounds complete")
    if last:
        typer.echo(f"  round {last[-1].round_index}: mean client accuracy {100 * last[-1].mean_accuracy:.2f}%")
    typer.echo(f"  metrics: {paths.metrics_csv}")
