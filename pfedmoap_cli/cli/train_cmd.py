"""``pfedmoap train``: run (or resume) a federation on a partition."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pfedmoap_cli.artifacts.partition import load_partition
from pfedmoap_cli.cli.parsing import parse_key_values
from pfedmoap_cli.engine.runner import IfExists, execute_run
from pfedmoap_cli.engine.workspace import check_run_id
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.tracking.registry import make_trackers

HELP = """Train a federation on the current (or a named) partition.

Settings come from the defaults, the dataset's recipe, --config FILE (TOML,
keys as in run.json's settings, optionally under [train]), then flags. So no
setting shows a default below: it depends on the dataset (its recipe is
data_recipes/<dataset>.toml), and run.json records the value used.

Examples:

  pfedmoap train --method promptfl --rounds 2 --local-epochs 1

  pfedmoap train --config my-run.toml --seed 2

  pfedmoap train --method promptfl --rounds 2 --local-epochs 1 --resume

  pfedmoap train --method pfedmoap --engine flower   # on Flower's simulation runtime

  pfedmoap train --engine flower --write-flower-app my-app   # an app for flwr run
"""


# Moved to pfedmoap_cli.engine.train_request (shared with pfedmoap_cli.api.train); re-exported here for sweep_cmd and tests.
from pfedmoap_cli.engine.train_request import (  # noqa: E402,F401
    Engine,
    check_federation_size,
    check_timeout,
    make_runtime,
    resolve_run,
    resolve_settings,
)


def train(
    ctx: typer.Context,
    method: Annotated[Optional[str], typer.Option("--method", "-m", metavar="NAME", help="Method name (zsclip, coop, promptfl, ...).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", metavar="N", help="Communication rounds.")] = None,
    local_epochs: Annotated[Optional[int], typer.Option("--local-epochs", metavar="N", help="Local epochs per round.")] = None,
    frac: Annotated[Optional[float], typer.Option("--frac", metavar="FRACTION", help="Fraction of clients sampled per round, in (0, 1].")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", metavar="N", help="Training batch size.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", metavar="N", help="Experiment seed (0 is honoured).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", metavar="LR", help="Prompt learning rate.")] = None,
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", metavar="N", help="Number of learnable context tokens (ignored with --ctx-init, whose phrase sets it).")] = None,
    ctx_init: Annotated[
        Optional[str],
        typer.Option(
            "--ctx-init",
            metavar="PHRASE", help="Initialise the context from a phrase, e.g. 'a photo of a'. The context length is then the phrase's "
            "number of BPE tokens, not its word count: 4 for 'a photo of a', but 7 for 'a close-up photo of a' (5 words).",
        ),
    ] = None,
    backbone: Annotated[Optional[str], typer.Option("--backbone", metavar="NAME", help="open_clip model name (RN50, ViT-B-16, tiny-vit, ...).")] = None,
    pretrained: Annotated[
        Optional[str], typer.Option("--pretrained", metavar="TAG|PATH|none", help="open_clip pretrained tag, a local checkpoint path, or 'none'.")
    ] = None,
    backbone_seed: Annotated[Optional[int], typer.Option("--backbone-seed", metavar="N", help="Init seed of a randomly initialised backbone.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda.")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast for the frozen encoders on GPU.")] = None,
    truncate_prompts: Annotated[
        Optional[bool], typer.Option("--truncate/--no-truncate", help="Run the text encoder only up to the last EOT token (exact in fp32; part of the run id, since under bf16 the last bits differ).")
    ] = None,
    eval_batch_size: Annotated[Optional[int], typer.Option("--eval-batch-size", metavar="N", help="Batch size for evaluation and features (part of the run id: FedOTP's transport is solved per batch).")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--workers", metavar="N", help="Image-loading worker processes (0: in the main process).")] = None,
    image_pipeline: Annotated[
        Optional[str], typer.Option("--image-pipeline", metavar="tensor|pil", help="'tensor': training images decoded once, augmented as tensors; "
                                    "'pil': decoded and augmented with PIL every epoch (runs made before 0.2). Part of the run id.")
    ] = None,
    batched: Annotated[
        Optional[bool], typer.Option("--batched/--per-client", help="Train a round's clients in lock step as one batched computation "
                                     "(methods that support it; local engine), or one after another. Equal within 1e-5 after a round, "
                                     "like another --device: not part of the run id.")
    ] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", metavar="N", help="Score the clients every N rounds (the last round always).")] = None,
    keep_rounds: Annotated[
        Optional[str], typer.Option("--keep-rounds", metavar="auto|all|N", help="Checkpoints kept on disk: 'auto' (the last complete round, "
                                    "all that resume needs), 'all', or the last N rounds. Not part of the run id.")
    ] = None,
    image_cache_mb: Annotated[
        Optional[int], typer.Option("--image-cache-mb", metavar="MIB", help="Memory for decoded training images; the rest go to the "
                                    "workspace's image cache on disk. Not part of the run id.")
    ] = None,
    method_option: Annotated[
        Optional[list[str]], typer.Option("--method-option", metavar="KEY=VALUE", help="Method-specific KEY=VALUE; repeatable.")
    ] = None,
    num_experts: Annotated[Optional[int], typer.Option("--num-experts", metavar="K", help="pFedMoAP: K, the number of non-local experts.")] = None,
    expert_selection: Annotated[
        Optional[str], typer.Option("--expert-selection", metavar="nearest|random", help="pFedMoAP: 'nearest' (default) or 'random'.")
    ] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", metavar="WEIGHT", help="pFedMoAP: weight of the local logits (0.5; Table 1 also 0).")] = None,
    gating_dim: Annotated[Optional[int], typer.Option("--gating-dim", metavar="D", help="pFedMoAP: pooled width d_g (must divide D).")] = None,
    gating_heads: Annotated[Optional[int], typer.Option("--gating-heads", metavar="H", help="pFedMoAP: attention heads of the gating network.")] = None,
    gating_scaling: Annotated[Optional[float], typer.Option("--gating-scaling", metavar="SIGMA", help="pFedMoAP: attention scaling sigma.")] = None,
    gating_lr: Annotated[Optional[float], typer.Option("--gating-lr", metavar="LR", help="pFedMoAP: learning rate of the gating network.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", metavar="FILE", help="TOML file of settings.")] = None,
    partition: Annotated[Optional[str], typer.Option("--partition", metavar="NAME|PATH", help="Partition file or name (default: the current one).")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", metavar="NAME", help="Name of the run (default: derived from its settings).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last complete round.")] = False,
    engine: Annotated[
        Engine,
        typer.Option(
            "--engine",
            help="Where the rounds run: 'local' (this process) or 'flower' (Flower's simulation runtime, one virtual "
            "SuperNode per client, the same run files; needs the flower extra). Not part of the run id.",
        ),
    ] = Engine.LOCAL,
    round_timeout: Annotated[
        Optional[float],
        typer.Option("--round-timeout", metavar="SECONDS", help="Flower: wait this long for the nodes' replies in each step of a round; "
                     "clients that have not answered are recorded as missing (default 3600)."),
    ] = None,
    write_flower_app: Annotated[
        Optional[Path],
        typer.Option("--write-flower-app", metavar="DIR", help="Instead of training, write a Flower app for a real deployment "
                     "(SuperLink + SuperNodes) with these settings to DIR; start it with 'flwr run DIR'."),
    ] = None,
    report_to: Annotated[
        Optional[list[str]],
        typer.Option("--report-to", metavar="TRACKER", help="Also log each round to tensorboard, mlflow or wandb (repeatable or "
                     "comma-separated; each needs its extra, e.g. pip install 'pfedmoap[mlflow]'). Resume continues the same tracker run. Not part of the run id."),
    ] = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", hidden=True, help="Stop after this many rounds (testing).")] = None,
) -> None:
    cli = ctx.obj
    ws = cli.ws
    if run_id is not None:
        check_run_id(run_id)  # before anything is read or written: the id becomes runs/<id> and locks/<id>.lock
    if write_flower_app is not None and engine is not Engine.FLOWER:
        raise ConfigError("--write-flower-app writes a Flower app; add --engine flower")
    # Flag errors before any file is read; a deployment app needs no local runtime.
    runtime = make_runtime(engine, round_timeout) if write_flower_app is None else None
    if report_to and write_flower_app is not None:
        raise ConfigError("--report-to is not carried into a Flower app (--write-flower-app); drop it")
    trackers = make_trackers(report_to)
    # Named pFedMoAP flags are shorthands for --method-option KEY=VALUE.
    named_options = dict(
        num_experts=num_experts, expert_selection=expert_selection, lam=lam, gating_dim=gating_dim,
        gating_heads=gating_heads, gating_scaling=gating_scaling, gating_lr=gating_lr,
    )
    options = {**parse_key_values(method_option or [], "--method-option"), **{k: v for k, v in named_options.items() if v is not None}}
    flags = dict(
        method=method, rounds=rounds, local_epochs=local_epochs, frac=frac, batch_size=batch_size, seed=seed, lr=lr,
        n_ctx=n_ctx, ctx_init=ctx_init, backbone=backbone, pretrained=pretrained, backbone_seed=backbone_seed,
        device=device, amp=amp, truncate_prompts=truncate_prompts, eval_batch_size=eval_batch_size,
        num_workers=num_workers, image_pipeline=image_pipeline, batched=batched, eval_every=eval_every,
        keep_rounds=keep_rounds, image_cache_mb=image_cache_mb, method_options=options or None,
    )
    settings, partition_path = resolve_run(ws, flags, config=config, partition=partition, run_id=run_id, resume=resume, device=device)
    if write_flower_app is not None:
        from pfedmoap_cli.engine.runner import refuse_base_to_novel_on_flower
        from pfedmoap_cli.flower.app_dir import deployment_instructions, write_flower_app as write_app

        if load_partition(partition_path)[0].base_to_novel:
            refuse_base_to_novel_on_flower(partition_path)

        app_file = write_app(write_flower_app, ws, partition_path, settings, run_id or "", check_timeout(round_timeout))
        typer.echo(f"wrote the Flower app {app_file}")
        typer.echo(deployment_instructions(write_flower_app, load_partition(partition_path)[0].num_clients))
        return
    outcome = execute_run(
        ws, cli.data_root, settings, partition_path, run_id=run_id,
        if_exists=IfExists.RESUME if resume else IfExists.ERROR, progress=cli.progress, stop_after=stop_after,
        runtime=runtime, observers=trackers,
    )
    if outcome.last_round is None and outcome.finished:
        typer.echo(f"run {outcome.run_id} is already complete ({outcome.total_rounds} rounds); see 'pfedmoap report'")
        return
    typer.echo(f"run {outcome.run_id}: {outcome.completed_rounds}/{outcome.total_rounds} rounds complete")
    if outcome.last_round is not None:
        last = outcome.last_round
        if last.mean_accuracy == last.mean_accuracy:
            typer.echo(f"  round {last.round_index}: mean client accuracy {100 * last.mean_accuracy:.2f}%")
        else:  # NaN: --eval-every skipped scoring in this round (the last round of a run is always scored)
            typer.echo(f"  round {last.round_index}: not scored (--eval-every {settings.eval_every})")
    typer.echo(f"  metrics: {outcome.paths.metrics_csv}")
