"""``pfedmoap download``: fetch and verify datasets (or say how to get them)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pfedmoap_cli.data.sources import dataset_names
from pfedmoap_cli.errors import ConfigError

HELP = """Download a dataset into the data root, or list what is available.

Examples:

  pfedmoap download --list

  pfedmoap download --dataset synthetic
"""

# Datasets of the paper whose loaders and downloaders are not built yet.
PLANNED = ("flowers102", "oxford_pets", "food101", "caltech101", "dtd", "domainnet", "office_caltech10", "cifar10", "cifar100")

NOTES = {
    "synthetic": "generated on the fly from a seed; nothing to download",
    "imagefolder": "your own images: one sub-folder per class (optionally under train/ and test/) in --data-root",
}


def download(
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset to fetch.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List datasets and their status.")] = False,
) -> None:
    available = dataset_names()
    if list_ or dataset is None:
        for name in available:
            typer.echo(f"{name:18s} available: {NOTES.get(name, 'ready')}")
        for name in PLANNED:
            if name not in available:
                typer.echo(f"{name:18s} not yet available")
        return
    if dataset in available:
        typer.echo(f"{dataset}: {NOTES.get(dataset, 'nothing to download')}")
        return
    if dataset in PLANNED:
        raise ConfigError(f"dataset '{dataset}' is not yet available in this version; see 'pfedmoap download --list'")
    raise ConfigError(f"unknown dataset '{dataset}'; see 'pfedmoap download --list'")
