"""``pfedmoap download``: fetch and verify datasets (or say how to get them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pfedmoap_cli.data.download import dataset_status, download_dataset, resources_of
from pfedmoap_cli.data.sources import dataset_class, dataset_names

HELP = """Download a dataset into the data root, or list the datasets and their status.

Files are verified against their published checksums and unpacked in the
layout the loaders read (see README, "Data"). Running it again skips what is
already in place. Files that cannot be fetched automatically (CoOp's split
files and FedBN's archives, on Google Drive) are listed with where to get them
and where to put them.

Examples:

  pfedmoap download --list

  pfedmoap download --dataset flowers102

  pfedmoap --data-root /data/pfedmoap download --dataset cifar10
"""

NOTES = {
    "synthetic": "built in: generated on the fly from a seed; nothing to download",
    "imagefolder": "your own images: one sub-folder per class (optionally under train/ and test/) in --data-root",
}


def _list(root: Path) -> None:
    typer.echo(f"data root: {root}")
    for name in dataset_names():
        cls = dataset_class(name)
        if not resources_of(cls):
            typer.echo(f"  {name:18s} {'-':10s} {NOTES.get(name, 'nothing to download')}")
            continue
        status = dataset_status(cls, root)
        detail = f"missing {', '.join(status.missing)}" if status.state == "incomplete" else ""
        typer.echo(f"  {name:18s} {status.state:10s} {detail}".rstrip())


def download(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", metavar="NAME", help="Dataset to fetch (see --list).")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the datasets and whether each is present under --data-root.")] = False,
) -> None:
    cli = ctx.obj
    root = Path(cli.data_root)
    if list_ or dataset is None:
        _list(root)
        return
    cls = dataset_class(dataset)  # ConfigError naming the valid datasets
    if not resources_of(cls):
        typer.echo(f"{dataset}: {NOTES.get(dataset, 'nothing to download')}")
        return
    download_dataset(cls, root, progress=cli.progress, echo=typer.echo)
