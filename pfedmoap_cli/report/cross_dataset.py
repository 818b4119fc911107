"""The cross-dataset scores of a workspace's runs, for ``pfedmoap report``.

Each run's ``cross_dataset.csv`` (written by ``pfedmoap evaluate --dataset``)
holds its global part scored on other datasets; the report lists them in one
table, saying that only the global part was scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from pfedmoap_cli.artifacts.cross_dataset_table import read_cross_dataset
from pfedmoap_cli.errors import ArtifactError

#: The line above the table in the report.
HEADING = "Cross-dataset: each run's global part only (client states are private), scored on every class of another dataset"
COLUMNS = ["run_id", "round", "dataset", "num_classes", "num_examples", "accuracy", "part"]


def cross_dataset_summary(runs_dir: Path, warn: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Every run's cross-dataset scores (accuracy in %), sorted by run, round and dataset; empty when there are none.

    A table that cannot be read is left out with one line passed to ``warn``.
    """
    rows = []
    for path in sorted(Path(runs_dir).glob("*/cross_dataset.csv")):
        try:
            table = read_cross_dataset(path)
        except (ArtifactError, OSError, UnicodeDecodeError) as error:
            if warn is not None:
                warn(f"warning: left out the cross-dataset scores of run {path.parent.name}: {error}")
            continue
        for row in table:
            try:
                rows.append({
                    "run_id": path.parent.name, "round": int(row["round"]), "dataset": row["dataset"],
                    "num_classes": int(row["num_classes"]), "num_examples": int(row["num_examples"]),
                    "accuracy": 100 * float(row["accuracy"]), "part": row["part"],
                })
            except (KeyError, TypeError, ValueError):
                if warn is not None:
                    warn(f"warning: left out a damaged cross-dataset row of run {path.parent.name} ({path}); evaluate it again")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["run_id", "round", "dataset"]).reset_index(drop=True) if not frame.empty else frame
