"""``pfedmoap partition``: split a dataset over clients into a partition file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pfedmoap_cli.artifacts.partition import save_partition
from pfedmoap_cli.cli.parsing import parse_key_values
from pfedmoap_cli.data.build_partition import PartitionSettings, build_partition
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.recipes import load_recipe

HELP = """Split a dataset over clients; the result becomes the current partition.

Examples:

  pfedmoap partition --dataset synthetic --clients 4 --dirichlet 0.5 --seed 1

  pfedmoap partition --dataset synthetic --pathological --shots 16 --clients 6

  pfedmoap partition --dataset synthetic --iid --clients 3

  pfedmoap partition --dataset imagefolder --data-root ~/my-images --dirichlet 0.3
"""


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


def check_partition_flags(settings: PartitionSettings) -> None:
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
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name (see 'pfedmoap download --list').")],
    clients: Annotated[Optional[int], typer.Option("--clients", "-n", help="Number of clients (recipe default otherwise).")] = None,
    dirichlet: Annotated[Optional[float], typer.Option("--dirichlet", help="Dirichlet label shift with this alpha (> 0).")] = None,
    pathological: Annotated[bool, typer.Option("--pathological", help="Disjoint class sets per client (Table 1).")] = False,
    iid: Annotated[bool, typer.Option("--iid", help="Uniformly random, equal-size shares.")] = False,
    shots: Annotated[Optional[int], typer.Option("--shots", help="Pathological: training images per owned class (0 = all).")] = None,
    min_size: Annotated[Optional[int], typer.Option("--min-size", help="Dirichlet: least train and test samples per client (>= 1).")] = None,
    clients_per_domain: Annotated[
        Optional[int], typer.Option("--clients-per-domain", help="Domain feature shift: split each domain over this many clients.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Partition seed (0 is a seed like any other).")] = 1,
    option: Annotated[
        Optional[list[str]], typer.Option("--option", "-o", help="Dataset option KEY=VALUE (e.g. seed=3 for synthetic); repeatable.")
    ] = None,
) -> None:
    cli = ctx.obj
    recipe = load_recipe(dataset).get("partition", {})
    if clients is not None and clients_per_domain is None and recipe.get("clients_per_domain") is not None:
        raise ConfigError(
            f"dataset {dataset} is split per domain ({recipe['clients_per_domain']} clients per domain by default); "
            "pass --clients-per-domain N instead of --clients"
        )
    scheme = choose_scheme(dirichlet, pathological, iid, recipe)
    dataset_options = {**recipe.get("dataset_options", {}), **parse_key_values(option or [], "--option")}
    settings = PartitionSettings(
        scheme=scheme,
        num_clients=clients if clients is not None else int(recipe.get("clients", 10)),
        seed=seed,
        alpha=dirichlet if dirichlet is not None else recipe.get("alpha"),
        shots=shots if shots is not None else recipe.get("shots"),
        min_size=min_size if min_size is not None else int(recipe.get("min_size", 2)),
        clients_per_domain=clients_per_domain if clients_per_domain is not None else recipe.get("clients_per_domain"),
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
    source = open_dataset(dataset, Path(cli.data_root), **dataset_options)
    result = build_partition(source, settings, dataset_options)
    path, sha = save_partition(result, cli.ws.partitions_dir)
    sizes = [len(c.train) for c in result.clients]
    typer.echo(f"partition {path.name} ({result.scheme}, {result.num_clients} clients, {len(result.class_names)} classes)")
    typer.echo(f"  sha256 {sha}")
    typer.echo(f"  train samples per client: min {min(sizes)}, max {max(sizes)}, total {sum(sizes)}")
    typer.echo(f"  written to {path} and made current")
