"""``pfedmoap partition``: split a dataset over clients into a partition file."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pfedmoap_cli import api
from pfedmoap_cli.api import check_partition_flags, choose_scheme  # noqa: F401  (their home before the API)
from pfedmoap_cli.cli.parsing import parse_key_values

HELP = """Split a dataset over clients; the result becomes the current partition.

Examples:

  pfedmoap partition --dataset synthetic --clients 4 --dirichlet 0.5 --seed 1

  pfedmoap partition --dataset synthetic --pathological --shots 16 --clients 6

  pfedmoap partition --dataset synthetic --iid --clients 3

  pfedmoap partition --dataset synthetic --pathological --base-to-novel   # train on the first half of the classes

  pfedmoap partition --dataset imagefolder --data-root ~/my-images --dirichlet 0.3
"""


def partition(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", "-d", metavar="NAME", help="Dataset name (see 'pfedmoap download --list').")],
    clients: Annotated[Optional[int], typer.Option("--clients", "-n", metavar="N", help="Number of clients (recipe default otherwise).")] = None,
    dirichlet: Annotated[Optional[float], typer.Option("--dirichlet", metavar="ALPHA", help="Dirichlet label shift with this alpha (> 0).")] = None,
    pathological: Annotated[bool, typer.Option("--pathological", help="Disjoint class sets per client (Table 1).")] = False,
    iid: Annotated[bool, typer.Option("--iid", help="Uniformly random, equal-size shares.")] = False,
    shots: Annotated[Optional[int], typer.Option("--shots", metavar="K", help="Pathological: training images per owned class (0 = all).")] = None,
    min_size: Annotated[Optional[int], typer.Option("--min-size", metavar="N", help="Dirichlet: least train and test samples per client (>= 1).")] = None,
    clients_per_domain: Annotated[
        Optional[int], typer.Option("--clients-per-domain", metavar="N", help="Domain feature shift: split each domain over this many clients.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Partition seed (0 is a seed like any other).")] = 1,
    base_to_novel: Annotated[
        bool,
        typer.Option(
            "--base-to-novel",
            help="Base-to-novel generalisation: clients get the first ceil(C/2) classes only (base); training runs then also "
            "score every client on all base and all novel test images (local engine).",
        ),
    ] = False,
    option: Annotated[
        Optional[list[str]], typer.Option("--option", "-o", metavar="KEY=VALUE", help="Dataset option KEY=VALUE (e.g. seed=3 for synthetic); repeatable.")
    ] = None,
) -> None:
    cli = ctx.obj
    result = api.partition(
        dataset=dataset, workspace=cli.workspace, data_root=cli.data_root, clients=clients, dirichlet=dirichlet,
        pathological=pathological, iid=iid, shots=shots, min_size=min_size, clients_per_domain=clients_per_domain, seed=seed,
        dataset_options=parse_key_values(option or [], "--option"),
        base_to_novel=base_to_novel or None,  # unset: the dataset recipe's [partition] base_to_novel
    )
    sizes = result.train_sizes
    typer.echo(f"partition {result.path.name} ({result.scheme}, {result.num_clients} clients, {result.num_classes} classes)")
    if result.base_to_novel:
        typer.echo(f"  base-to-novel: clients hold the {result.num_classes} base classes; the other classes are novel (evaluation only)")
    typer.echo(f"  sha256 {result.sha256}")
    typer.echo(f"  train samples per client: min {min(sizes)}, max {max(sizes)}, total {sum(sizes)}")
    typer.echo(f"  written to {result.path} and made current")
