"""From what a user asked for to the settings and partition of one run.

Shared by ``pfedmoap train`` and :func:`pfedmoap_cli.api.train`, so the
command line and the Python API resolve a run the same way: defaults < the
dataset recipe's ``[train]`` < a TOML config file < explicit values, the
method's options checked against the federation, and ``resume`` of a named
run taking every setting (but the device) from the run itself.

Messages name the command-line flags; the API's keyword arguments have the
same names (``--local-epochs`` is ``local_epochs=``).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from pfedmoap_cli.artifacts.partition import load_partition, resolve_partition_path
from pfedmoap_cli.engine.run_record import partition_path_of, read_run_record, run_settings
from pfedmoap_cli.engine.session import applicable_options
from pfedmoap_cli.engine.settings import TrainSettings, merge_settings, settle_context_length, validate_settings
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import ArtifactError, ConfigError
from pfedmoap_cli.recipes import load_recipe, read_toml


class Engine(str, Enum):
    """Where a run's rounds execute."""

    LOCAL = "local"
    FLOWER = "flower"


def make_runtime(engine: Engine, round_timeout: float | None):
    """The runtime of ``--engine`` (None: the in-process default)."""
    if engine is Engine.LOCAL:
        if round_timeout is not None:
            raise ConfigError("--round-timeout applies to --engine flower only; drop it or add --engine flower")
        return None
    from pfedmoap_cli.flower import require_flower

    require_flower()
    from pfedmoap_cli.flower.simulation import FlowerSimulationRuntime, simulation_options

    return FlowerSimulationRuntime(simulation_options(check_timeout(round_timeout)))


def check_timeout(round_timeout: float | None) -> float:
    """``--round-timeout`` in seconds (the Flower default when not given)."""
    from pfedmoap_cli.flower.server import FlowerOptions

    if round_timeout is None:
        return FlowerOptions().round_timeout
    if not round_timeout > 0:
        raise ConfigError(f"--round-timeout must be a positive number of seconds, got {round_timeout}")
    return float(round_timeout)


def resolve_settings(dataset: str, config: Path | None, flags: dict[str, Any], num_clients: int | None = None) -> TrainSettings:
    """Defaults < recipe [train] < config file < flags, validated.

    The recipe's ``method_options`` are defaults for whichever methods take
    them; options from the config file or flags must all be understood.
    With ``num_clients`` (the partition's), options the user gave are also
    checked against the federation's size.
    """
    recipe = dict(load_recipe(dataset).get("train", {}))
    recipe_options = recipe.pop("method_options", {}) or {}
    settings = merge_settings(TrainSettings(), recipe, f"the {dataset} recipe")
    user: dict[str, Any] = {}
    if config is not None:
        data = read_toml(config, "config file")
        user = dict(data.get("train", data))
        settings = merge_settings(settings, user, f"config file {config}")
    settings = merge_settings(settings, flags, "the command line")
    defaults = applicable_options(settings.method, dict(recipe_options))
    settings = dataclasses.replace(settings, method_options={**defaults, **settings.method_options})
    settings = validate_settings(settings)
    given = {k.replace("-", "_") for k in user} | {k for k, v in flags.items() if v is not None}
    explicit_options = set((user.get("method_options") or {}) if isinstance(user.get("method_options"), dict) else ()) | set(
        flags.get("method_options") or {}
    )
    if num_clients is not None:
        check_federation_size(settings, explicit_options, num_clients)
    return settle_context_length(settings, n_ctx_given="n_ctx" in given)


def check_federation_size(settings: TrainSettings, explicit_options: set[str], num_clients: int) -> None:
    """Refuse options the user gave that this many clients cannot honour (before any run file exists)."""
    if settings.method == "pfedmoap" and "num_experts" in explicit_options:
        from pfedmoap_cli.methods.pfedmoap import check_num_experts

        check_num_experts(int(settings.method_options["num_experts"]), num_clients)


def resolve_run(
    ws: Workspace,
    flags: Mapping[str, Any],
    *,
    config: Path | None,
    partition: str | None,
    run_id: str | None,
    resume: bool,
    device: str | None,
) -> tuple[TrainSettings, Path]:
    """The settings and partition file of the run asked for.

    ``flags`` are the explicit settings (None: not given), ``method_options``
    among them. With ``resume`` and a ``run_id`` the run's own settings are
    used (only ``device`` may change) and its partition must be unchanged;
    otherwise the settings are resolved for the chosen (default: current)
    partition's dataset.
    """
    if resume and run_id:
        record = read_run_record(RunPaths(ws.run_dir(run_id)))
        # Only the device may change on resume; everything else (eval_batch_size too:
        # FedOTP's scores depend on it) is part of the run's identity.
        given = sorted(k for k, v in flags.items() if v is not None and k != "device")
        if given or config:
            drop = ", ".join("--" + g.replace("_", "-") for g in given) or "--config"
            raise ConfigError(f"--resume --run-id takes its settings from the run; drop {drop}")
        settings = run_settings(record)
        settings = validate_settings(merge_settings(settings, {"device": device}, "the command line"))
        partition_path = partition_path_of(record, ws.root)
        if load_partition(partition_path)[1] != record["partition_sha256"]:
            raise ArtifactError(f"partition {partition_path} changed since run {run_id} started; it cannot be resumed")
    else:
        partition_path = resolve_partition_path(ws.partitions_dir, partition)
        chosen = load_partition(partition_path)[0]
        settings = resolve_settings(chosen.dataset, config, dict(flags), num_clients=chosen.num_clients)
    return settings, partition_path
