"""``runs/<id>/cross_dataset.csv``: a run's global part scored on other datasets.

One row per (round, dataset, dataset options); scoring the same again
replaces its row, other rows are kept. The file is replaced whole and
atomically, like every artifact.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pfedmoap_cli.artifacts.atomic import atomic_write_text
from pfedmoap_cli.errors import ArtifactError

COLUMNS = ("run_id", "round", "dataset", "dataset_options", "num_classes", "num_examples", "accuracy", "loss", "part")


def read_cross_dataset(path: Path) -> list[dict[str, str]]:
    """The rows of ``path`` (none when it does not exist); ArtifactError for a file that is not ours."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ArtifactError(f"{path} is not a cross-dataset table (its header is not {','.join(COLUMNS)}); delete it and evaluate again")
        return list(reader)


def record_cross_dataset(path: Path, row: dict[str, object]) -> None:
    """Add ``row`` to ``path``, replacing an earlier row of the same round, dataset and options."""
    key = (str(row["round"]), str(row["dataset"]), str(row["dataset_options"]))
    rows = [r for r in read_cross_dataset(path) if (r["round"], r["dataset"], r["dataset_options"]) != key]
    rows.append({name: str(row[name]) for name in COLUMNS})
    rows.sort(key=lambda r: (int(r["round"]), r["dataset"], r["dataset_options"]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def options_text(options: dict) -> str:
    """Dataset options as a canonical string for the table (sorted JSON)."""
    return json.dumps(options, sort_keys=True, separators=(",", ":"))
