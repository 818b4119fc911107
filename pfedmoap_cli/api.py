"""The stable Python API of pfedmoap: partition, train, evaluate and report from Python.

This module is the stable import surface (everything in ``__all__``); the
rest of the package may change between releases. Each function does what the
command of the same name does, with keyword arguments named after its flags
(``--local-epochs`` is ``local_epochs=``, ``--method-option K=V`` is
``method_options={"K": V}``), writes the same workspace files, and returns a
frozen dataclass instead of printing. A problem the caller can fix raises a
:class:`UserError` subclass (:class:`ConfigError`, :class:`DataError`,
:class:`ArtifactError`, :class:`StorageError`, ...) with the one-line message
the command prints; nothing here calls ``sys.exit``. The ``pfedmoap``
partition, evaluate and report commands are thin wrappers around these
functions, and ``train`` resolves its run through the same code
(:mod:`pfedmoap_cli.engine.train_request`).

Example (a notebook)::

    from pfedmoap_cli import api

    part = api.partition(workspace="ws", dataset="synthetic", pathological=True, clients=4, seed=1)
    run = api.train(workspace="ws", method="promptfl", rounds=2, local_epochs=1)
    run.metrics.query("split == 'test' and metric == 'accuracy'").groupby("round")["value"].mean()
    api.report(workspace="ws").frame
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from pfedmoap_cli.errors import ArtifactError, ConfigError, DataError, FederationError, StorageError, UserError
from pfedmoap_cli.methods.base import method_names
from pfedmoap_cli.report.runs import summarize_runs, to_markdown

__all__ = [
    "partition",
    "train",
    "evaluate",
    "evaluate_on_dataset",
    "report",
    "method_names",
    "PartitionResult",
    "TrainResult",
    "RoundScore",
    "EvaluationResult",
    "CrossDatasetResult",
    "ReportResult",
    "UserError",
    "ConfigError",
    "DataError",
    "ArtifactError",
    "StorageError",
    "FederationError",
]

PathLike = str | os.PathLike
#: The defaults of ``--workspace`` and ``--data-root`` (the environment variables are the CLI's, not read here).
DEFAULT_WORKSPACE = Path("pfedmoap-workspace")
DEFAULT_DATA_ROOT = Path("data")


# ---- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionResult:
    """A partition written by :func:`partition` (and made the workspace's current one)."""

    path: Path
    sha256: str
    dataset: str
    scheme: str
    num_clients: int
    num_classes: int
    #: Training samples of each client, in client order.
    train_sizes: tuple[int, ...]
    #: A base-to-novel partition: ``num_classes`` are the base classes; the others are held out.
    base_to_novel: bool = False


@dataclass(frozen=True)
class TrainResult:
    """Where a run stands after :func:`train`."""

    run_id: str
    run_dir: Path
    completed_rounds: int
    total_rounds: int
    finished: bool
    #: Mean client test accuracy (a fraction) of the last round trained by this call; None when none was.
    last_mean_accuracy: float | None
    #: The run's settings as resolved (run.json's ``settings``).
    settings: Mapping[str, Any]
    #: The run's metrics.csv (one row per round, client, split and metric; empty before round 0 completes).
    metrics: pd.DataFrame


@dataclass(frozen=True)
class RoundScore:
    """One re-scored round of :func:`evaluate`."""

    round: int
    mean_accuracy: float
    clients: int


@dataclass(frozen=True)
class EvaluationResult:
    """The re-scored rounds of :func:`evaluate`, also written to ``path`` (runs/<id>/evaluation.csv)."""

    run_id: str
    path: Path
    rounds: tuple[RoundScore, ...]
    #: evaluation.csv as read back (the columns of metrics.csv).
    frame: pd.DataFrame


@dataclass(frozen=True)
class ReportResult:
    """What :func:`report` built and wrote.

    Without ``table``: ``frame`` has one row per run (reports/runs.csv; empty,
    and nothing written, when no run has a finished round). With ``table``:
    ``frame`` is the table's CSV (one line per row and column), ``markdown``
    its markdown, ``files`` the .md, .csv and .tex written and ``plots`` the
    PNGs (``plot_note`` says why there are none).
    """

    frame: pd.DataFrame
    markdown: str
    files: tuple[Path, ...]
    plots: tuple[Path, ...] = ()
    plot_note: str | None = None
    #: One line per run left out of the report (damaged or incomplete metrics).
    warnings: tuple[str, ...] = ()


# ---- helpers ------------------------------------------------------------------------------------


def _workspace(root: PathLike):
    """The workspace at ``root``, refused (StorageError) when ``root`` is a file: the CLI's own check."""
    from pfedmoap_cli.cli.context import CliContext

    return CliContext(Path(root), DEFAULT_DATA_ROOT, False).ws


def _option_names(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Option keys as the settings spell them (``gating-dim`` -> ``gating_dim``)."""
    return {str(k).strip().replace("-", "_"): v for k, v in (options or {}).items()}


def _read_metrics(path: Path) -> pd.DataFrame:
    from pfedmoap_cli.artifacts.metrics import METRIC_COLUMNS

    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=METRIC_COLUMNS)


# ---- partition ----------------------------------------------------------------------------------


def choose_scheme(dirichlet: float | None, pathological: bool, iid: bool, recipe: dict[str, Any]) -> str:
    """The one scheme the flags ask for, else the recipe's default."""
    chosen = [name for name, on in (("dirichlet", dirichlet is not None), ("pathological", pathological), ("iid", iid)) if on]
    if len(chosen) > 1:
        raise ConfigError(f"choose one partition scheme, got {' and '.join('--' + c for c in chosen)}")
    if chosen:
        return chosen[0]
    scheme = recipe.get("scheme")
    if scheme is None:
        raise ConfigError("choose a partition scheme: --dirichlet ALPHA, --pathological or --iid")
    return str(scheme)


def check_partition_flags(settings) -> None:
    """Refuse out-of-range numbers before the dataset is opened or anything is written.

    ``--dirichlet inf`` and ``nan`` parse as floats; ``nan`` fails every
    comparison, so finiteness is checked first.
    """
    if settings.num_clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {settings.num_clients}")
    if settings.alpha is not None and not (math.isfinite(float(settings.alpha)) and float(settings.alpha) > 0):
        raise ConfigError(f"--dirichlet alpha must be a finite number > 0, got {settings.alpha}; pass e.g. --dirichlet 0.3")
    if settings.clients_per_domain is not None and settings.clients_per_domain < 1:
        raise ConfigError(f"--clients-per-domain must be at least 1, got {settings.clients_per_domain}")
    if settings.seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {settings.seed}")


def partition(
    *,
    dataset: str,
    workspace: PathLike = DEFAULT_WORKSPACE,
    data_root: PathLike = DEFAULT_DATA_ROOT,
    clients: int | None = None,
    dirichlet: float | None = None,
    pathological: bool = False,
    iid: bool = False,
    shots: int | None = None,
    min_size: int | None = None,
    clients_per_domain: int | None = None,
    seed: int = 1,
    dataset_options: Mapping[str, Any] | None = None,
    base_to_novel: bool | None = None,
) -> PartitionResult:
    """Split ``dataset`` over clients into a partition file and make it the workspace's current one.

    As ``pfedmoap partition``: at most one of ``dirichlet=ALPHA``,
    ``pathological=True`` and ``iid=True`` (else the dataset recipe's scheme);
    unset numbers come from the recipe. ``dataset_options`` are the
    ``--option KEY=VALUE`` pairs (e.g. ``{"seed": 3}`` for synthetic), on top of
    the recipe's. ``base_to_novel=True`` (``--base-to-novel``; unset: the
    recipe's ``base_to_novel``) gives the clients the first ceil(C/2) classes
    only; runs on it also score base and novel classes. Raises :class:`ConfigError` for bad values before anything is
    read or written.
    """
    from pfedmoap_cli.artifacts.partition import save_partition
    from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
    from pfedmoap_cli.data.sources import open_dataset
    from pfedmoap_cli.recipes import load_recipe

    recipe = load_recipe(dataset).get("partition", {})
    if clients is not None and clients_per_domain is None and recipe.get("clients_per_domain") is not None:
        raise ConfigError(
            f"dataset {dataset} is split per domain ({recipe['clients_per_domain']} clients per domain by default); "
            "pass --clients-per-domain N instead of --clients"
        )
    scheme = choose_scheme(dirichlet, pathological, iid, recipe)
    options = {**recipe.get("dataset_options", {}), **_option_names(dataset_options)}
    settings = PartitionSettings(
        scheme=scheme,
        num_clients=clients if clients is not None else int(recipe.get("clients", 10)),
        seed=seed,
        alpha=dirichlet if dirichlet is not None else recipe.get("alpha"),
        shots=shots if shots is not None else recipe.get("shots"),
        min_size=min_size if min_size is not None else int(recipe.get("min_size", 2)),
        clients_per_domain=clients_per_domain if clients_per_domain is not None else recipe.get("clients_per_domain"),
        base_to_novel=base_to_novel if base_to_novel is not None else bool(recipe.get("base_to_novel", False)),
    )
    check_partition_flags(settings)
    if settings.scheme == "dirichlet" and settings.alpha is None:
        raise ConfigError("the Dirichlet scheme needs --dirichlet ALPHA")
    if settings.scheme == "dirichlet" and settings.min_size < 1:
        # Checked before the dataset is opened: 0 would allow a client with no
        # train or test samples, which is never a usable partition.
        raise ConfigError(f"--min-size must be at least 1 (every client needs train and test samples), got {settings.min_size}")
    if settings.scheme == "pathological" and settings.shots is not None and settings.shots < 0:
        raise ConfigError("--shots must be 0 (all) or positive")
    source = open_dataset(dataset, Path(data_root), **options)
    result = build_partition(source, settings, options)
    path, sha = save_partition(result, _workspace(workspace).partitions_dir)
    return PartitionResult(
        path=path,
        sha256=sha,
        dataset=result.dataset,
        scheme=result.scheme,
        num_clients=result.num_clients,
        num_classes=len(result.class_names),
        train_sizes=tuple(len(c.train) for c in result.clients),
        base_to_novel=bool(result.params.get("base_to_novel", False)),
    )


# ---- train --------------------------------------------------------------------------------------


def train(
    *,
    workspace: PathLike = DEFAULT_WORKSPACE,
    data_root: PathLike = DEFAULT_DATA_ROOT,
    method: str | None = None,
    rounds: int | None = None,
    local_epochs: int | None = None,
    frac: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    lr: float | None = None,
    n_ctx: int | None = None,
    ctx_init: str | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    backbone_seed: int | None = None,
    device: str | None = None,
    amp: bool | None = None,
    truncate_prompts: bool | None = None,
    eval_batch_size: int | None = None,
    num_workers: int | None = None,
    image_pipeline: str | None = None,
    batched: bool | None = None,
    eval_every: int | None = None,
    keep_rounds: str | int | None = None,
    image_cache_mb: int | None = None,
    method_options: Mapping[str, Any] | None = None,
    config: PathLike | None = None,
    partition: str | None = None,
    run_id: str | None = None,
    resume: bool = False,
    engine: str = "local",
    round_timeout: float | None = None,
    stop_after: int | None = None,
    report_to: Sequence[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) a federation on the current (or a named) partition, as ``pfedmoap train``.

    Settings: the defaults < the dataset recipe's ``[train]`` < ``config`` (a
    TOML file) < the keyword arguments given (None: not given).
    ``method_options`` are the method's options (its ``Options`` dataclass
    fields, e.g. ``{"num_experts": 4}`` for pFedMoAP), for built-in and
    plug-in methods alike. ``run_id`` names the run (default: derived from
    the settings). ``resume=True`` continues the run from its last complete
    round (with ``run_id``: every setting but ``device`` comes from the run).
    ``engine="flower"`` runs the rounds on Flower's simulation runtime (needs
    the flower extra). ``stop_after`` stops after that many rounds of the run
    (continue later with ``resume=True``). ``report_to`` also logs each
    round to experiment trackers (``["tensorboard"]``, ``"mlflow"``, ``"wandb"``;
    each needs its extra), as ``--report-to``.

    Raises :class:`ConfigError` for bad settings, :class:`ArtifactError` when
    the run already exists (pass ``resume=True``) or its files are damaged,
    :class:`StorageError` when the workspace cannot be written.
    """
    from pfedmoap_cli.engine.runner import IfExists, execute_run
    from pfedmoap_cli.engine.train_request import Engine, make_runtime, resolve_run
    from pfedmoap_cli.engine.workspace import check_run_id
    from pfedmoap_cli.tracking.registry import make_trackers

    ws = _workspace(workspace)
    if run_id is not None:
        check_run_id(run_id)  # before anything is read or written: the id becomes runs/<id> and locks/<id>.lock
    try:
        chosen_engine = Engine(engine)
    except ValueError:
        raise ConfigError(f"engine must be 'local' or 'flower', got {engine!r}") from None
    runtime = make_runtime(chosen_engine, round_timeout)
    trackers = make_trackers(report_to)
    options = _option_names(method_options)
    flags = dict(
        method=method, rounds=rounds, local_epochs=local_epochs, frac=frac, batch_size=batch_size, seed=seed, lr=lr,
        n_ctx=n_ctx, ctx_init=ctx_init, backbone=backbone, pretrained=pretrained, backbone_seed=backbone_seed,
        device=device, amp=amp, truncate_prompts=truncate_prompts, eval_batch_size=eval_batch_size,
        num_workers=num_workers, image_pipeline=image_pipeline, batched=batched, eval_every=eval_every,
        keep_rounds=None if keep_rounds is None else str(keep_rounds), image_cache_mb=image_cache_mb, method_options=options or None,
    )
    settings, partition_path = resolve_run(
        ws, flags, config=Path(config) if config is not None else None, partition=partition, run_id=run_id, resume=resume, device=device
    )
    outcome = execute_run(
        ws, Path(data_root), settings, partition_path, run_id=run_id,
        if_exists=IfExists.RESUME if resume else IfExists.ERROR, progress=progress, stop_after=stop_after, runtime=runtime,
        observers=trackers,
    )
    return TrainResult(
        run_id=outcome.run_id,
        run_dir=outcome.paths.root,
        completed_rounds=outcome.completed_rounds,
        total_rounds=outcome.total_rounds,
        finished=outcome.finished,
        last_mean_accuracy=None
        if outcome.last_round is None or outcome.last_round.mean_accuracy != outcome.last_round.mean_accuracy  # NaN: not scored
        else float(outcome.last_round.mean_accuracy),
        settings=settings.to_json(),
        metrics=_read_metrics(outcome.paths.metrics_csv),
    )


# ---- evaluate -----------------------------------------------------------------------------------


def evaluate(
    run_id: str,
    *,
    workspace: PathLike = DEFAULT_WORKSPACE,
    data_root: PathLike = DEFAULT_DATA_ROOT,
    round: int | None = None,  # noqa: A002 -- the flag's name
    device: str | None = None,
    progress: bool = True,
    on_round: Callable[[RoundScore], None] | None = None,
) -> EvaluationResult:
    """Re-score a run's saved checkpoints into runs/<id>/evaluation.csv, as ``pfedmoap evaluate``.

    Every complete round whose checkpoints are still on disk (with
    ``--keep-rounds auto``, the last one; ``all`` keeps every round), or only
    ``round``: a round whose checkpoints ``--keep-rounds`` deleted is refused
    in one line. ``on_round`` is called with each round's score as soon as it
    is computed. Every round is scored (its files
    verified first) before anything is written, and the file is replaced
    whole: a failed evaluate leaves the previous evaluation.csv as it was.
    """
    from pfedmoap_cli.artifacts.metrics import format_metric_rows, write_metrics_text
    from pfedmoap_cli.artifacts.partition import load_partition
    from pfedmoap_cli.engine.federation import Federation
    from pfedmoap_cli.engine.retention import rescorable_rounds
    from pfedmoap_cli.engine.run_record import completed_rounds, partition_path_of, read_run_record, run_settings
    from pfedmoap_cli.engine.session import open_session
    from pfedmoap_cli.engine.workspace import RunPaths, check_run_id

    run = run_id
    check_run_id(run, "--run")
    ws = _workspace(workspace)
    paths = RunPaths(ws.run_dir(run))
    record = read_run_record(paths)
    settings = run_settings(record)
    if device:
        settings = dataclasses.replace(settings, device=device)
    if paths.clients_on_nodes.is_file():
        raise ArtifactError(
            f"run {run} was trained on Flower SuperNodes and its client states are on them, not here; "
            "it cannot be re-scored from this workspace"
        )
    done = completed_rounds(paths, settings.rounds)
    if done == 0:
        raise ArtifactError(f"run {run} has no complete round yet; train it first ('pfedmoap train --resume --run-id {run}')")
    if round is not None and not 0 <= round < done:
        raise ConfigError(f"--round must be between 0 and {done - 1} for run {run}")
    rounds = rescorable_rounds(paths, done) if round is None else [round]
    if not rounds:
        raise ArtifactError(f"run {run} has no round whose checkpoints are all on disk; train with --keep-rounds all to keep every round")
    partition_path = partition_path_of(record, ws.root)
    chosen, sha = load_partition(partition_path)
    if sha != record["partition_sha256"]:
        raise ArtifactError(f"partition {partition_path} changed since run {run} was trained; it cannot be re-scored")
    session = open_session(settings, chosen, sha, Path(data_root), ws.features_cache_dir, progress=progress)
    federation = Federation(session, run, paths, progress=progress)
    body, scores = [], []
    for r in rounds:
        rows = federation.reevaluate(r)
        body.append(format_metric_rows(rows))
        accuracies = [row.value for row in rows if row.split == "test" and row.metric == "accuracy"]
        score = RoundScore(r, sum(accuracies) / len(accuracies), len(accuracies))
        scores.append(score)
        if on_round is not None:
            on_round(score)
    write_metrics_text(paths.evaluation_csv, "".join(body))
    return EvaluationResult(run_id=run, path=paths.evaluation_csv, rounds=tuple(scores), frame=_read_metrics(paths.evaluation_csv))


@dataclass(frozen=True)
class CrossDatasetResult:
    """A run's global part scored on every class of another dataset (:func:`evaluate_on_dataset`)."""

    run_id: str
    round: int
    dataset: str
    num_classes: int
    num_examples: int
    accuracy: float
    #: What was scored, in words (e.g. "the global prompt").
    part: str
    #: runs/<id>/cross_dataset.csv, where the score was recorded.
    path: Path


def evaluate_on_dataset(
    run_id: str,
    dataset: str,
    *,
    dataset_options: dict | None = None,
    workspace: PathLike = DEFAULT_WORKSPACE,
    data_root: PathLike = DEFAULT_DATA_ROOT,
    round: int | None = None,  # noqa: A002 -- the flag's name
    device: str | None = None,
    progress: bool = True,
) -> CrossDatasetResult:
    """Score a finished run's global part on every test image and class of ``dataset``, as
    ``pfedmoap evaluate --run R --dataset D``.

    The round (default: the last complete one) must still have its server
    checkpoint, verified against its manifest first. Client states are not
    used: private parts stay with their clients, and a method without a global
    part is refused in one line. The score is added to
    runs/<id>/cross_dataset.csv (replacing an earlier score of the same round,
    dataset and options).
    """
    from pfedmoap_cli.artifacts.cross_dataset_table import options_text, record_cross_dataset
    from pfedmoap_cli.artifacts.partition import load_partition
    from pfedmoap_cli.engine.cross_dataset import score_on_dataset, transferable_part
    from pfedmoap_cli.engine.recorder import RunRecorder
    from pfedmoap_cli.engine.retention import refuse_deleted_round
    from pfedmoap_cli.engine.run_record import completed_rounds, partition_path_of, read_run_record, run_settings
    from pfedmoap_cli.engine.workspace import RunPaths, check_run_id
    from pfedmoap_cli.methods.base import get_method
    from pfedmoap_cli.model.backbone import resolve_device

    check_run_id(run_id, "--run")
    options = dict(dataset_options or {})
    ws = _workspace(workspace)
    paths = RunPaths(ws.run_dir(run_id))
    record = read_run_record(paths)
    settings = run_settings(record)
    if device:
        settings = dataclasses.replace(settings, device=device)
    transferable_part(get_method(settings.method))  # refuse before anything is loaded
    done = completed_rounds(paths, settings.rounds)
    if done == 0:
        raise ArtifactError(f"run {run_id} has no complete round yet; train it first ('pfedmoap train --resume --run-id {run_id}')")
    chosen = done - 1 if round is None else round
    if not 0 <= chosen < done:
        raise ConfigError(f"--round must be between 0 and {done - 1} for run {run_id}")
    refuse_deleted_round(paths, run_id, chosen, done)
    partition, sha = load_partition(partition_path_of(record, ws.root))
    if sha != record["partition_sha256"]:
        raise ArtifactError(f"the partition of run {run_id} changed since it was trained; it cannot be scored")
    recorder = RunRecorder(run_id, settings, partition, sha, paths)
    recorder.verify_round(chosen)
    target_device = resolve_device(settings.device)
    server_state = recorder.load_server_state(chosen, target_device)
    score = score_on_dataset(
        run_id, settings, partition, chosen, server_state, dataset, options, Path(data_root), ws.features_cache_dir,
        device=target_device, progress=progress,
    )
    record_cross_dataset(paths.cross_dataset_csv, {
        "run_id": run_id, "round": chosen, "dataset": dataset, "dataset_options": options_text(options),
        "num_classes": score.num_classes, "num_examples": score.num_examples, "accuracy": repr(score.accuracy), "loss": repr(score.loss),
        "part": score.part,
    })
    return CrossDatasetResult(run_id, chosen, dataset, score.num_classes, score.num_examples, score.accuracy, score.part, paths.cross_dataset_csv)


# ---- report -------------------------------------------------------------------------------------


def report(
    *,
    workspace: PathLike = DEFAULT_WORKSPACE,
    table: str | None = None,
    plots: bool = True,
    warn: Callable[[str], None] | None = None,
) -> ReportResult:
    """Summarise the workspace's runs, or build a paper table from them, as ``pfedmoap report``.

    Without ``table``: one row per run with a finished round, written to
    reports/runs.csv (sorted by dataset, method, seed, run id), and the runs'
    cross-dataset scores, if any, in a second table (reports/cross_dataset.csv).
    With ``table``
    (1, 2, 3, 4, demo, or a table recipe .toml): reports/<table>.md, .csv and
    .tex, plus PNG plots when ``plots`` and matplotlib is installed. A run
    whose metrics are damaged or incomplete is left out, with one line passed
    to ``warn`` and kept in :attr:`ReportResult.warnings`.
    """
    from pfedmoap_cli.artifacts.atomic import atomic_write_text
    from pfedmoap_cli.report.cross_dataset import HEADING as CROSS_DATASET_HEADING
    from pfedmoap_cli.report.cross_dataset import cross_dataset_summary

    warnings: list[str] = []

    def _warn(line: str) -> None:
        warnings.append(line)
        if warn is not None:
            warn(line)

    if table is not None:
        return _table_report(workspace, table, plots, _warn, warnings)
    ws = _workspace(workspace)
    summary = summarize_runs(ws.runs_dir, warn=_warn)
    if summary.empty:
        return ReportResult(frame=summary, markdown="", files=(), warnings=tuple(warnings))
    summary = summary.sort_values(["dataset", "method", "seed", "run_id"]).reset_index(drop=True)
    out = ws.reports_dir / "runs.csv"
    atomic_write_text(out, summary.to_csv(index=False))
    markdown, files = to_markdown(summary), (out,)
    cross = cross_dataset_summary(ws.runs_dir, warn=_warn)
    if not cross.empty:
        cross_out = ws.reports_dir / "cross_dataset.csv"
        atomic_write_text(cross_out, cross.to_csv(index=False))
        markdown += f"\n\n{CROSS_DATASET_HEADING}:\n\n{to_markdown(cross)}"
        files = (out, cross_out)
    return ReportResult(frame=summary, markdown=markdown, files=files, warnings=tuple(warnings))


def _table_report(workspace: PathLike, table: str, plots: bool, warn: Callable[[str], None], warnings: list[str]) -> ReportResult:
    from pfedmoap_cli.artifacts.atomic import atomic_write_text
    from pfedmoap_cli.report import plots as plotting
    from pfedmoap_cli.report import render
    from pfedmoap_cli.report.table_recipes import load_table_recipe
    from pfedmoap_cli.report.tables import table_report

    recipe = load_table_recipe(table)
    ws = _workspace(workspace)
    built = table_report(ws, recipe, warn=warn)
    out = ws.reports_dir
    markdown, csv_text = render.to_markdown(built), render.to_csv(built)
    files = {out / f"{recipe.stem}.md": markdown, out / f"{recipe.stem}.csv": csv_text, out / f"{recipe.stem}.tex": render.to_latex(built)}
    for path, text in files.items():
        atomic_write_text(path, text)
    written: tuple[Path, ...] = ()
    note = None
    if not plots:
        pass
    elif not built.metrics:
        note = "no finished runs of this table yet"
    elif not plotting.plots_available():
        note = plotting.INSTALL_HINT
    else:
        written = tuple(plotting.write_plots(built, out))
    return ReportResult(
        frame=pd.read_csv(io.StringIO(csv_text)), markdown=markdown, files=tuple(files), plots=written, plot_note=note, warnings=tuple(warnings)
    )
