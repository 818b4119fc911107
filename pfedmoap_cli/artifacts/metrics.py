"""The long-format metrics CSV: one row per (round, client, split, metric).

Tables are derived from these files, never scraped from logs. Each write
replaces the file atomically with its old rows plus the new ones, so a crash
never leaves a torn row behind.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

from pfedmoap_cli.artifacts.atomic import atomic_write_text


@dataclass(frozen=True)
class MetricRow:
    """One measurement of one client in one round."""

    run_id: str
    method: str
    dataset: str
    partition_sha256: str
    seed: int
    round: int
    client_id: int
    domain: str
    split: str
    metric: str
    value: float
    num_examples: int


METRIC_COLUMNS = [f.name for f in fields(MetricRow)]
#: The first line of every metrics CSV.
METRICS_HEADER = ",".join(METRIC_COLUMNS) + "\n"


def format_metric_rows(rows: Iterable[MetricRow]) -> str:
    """The CSV lines of ``rows`` exactly as :func:`append_metrics` writes them (no header)."""
    return _format(rows)


def write_metrics_text(path: Path, body: str) -> None:
    """Atomically replace the CSV at ``path`` with the header and ``body`` (rows already formatted)."""
    atomic_write_text(Path(path), METRICS_HEADER + body)


def _format(rows: Iterable[MetricRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow(
            [
                row.run_id,
                row.method,
                row.dataset,
                row.partition_sha256,
                row.seed,
                row.round,
                row.client_id,
                row.domain,
                row.split,
                row.metric,
                repr(float(row.value)),
                row.num_examples,
            ]
        )
    return buffer.getvalue()


def append_metrics(path: Path, rows: Iterable[MetricRow]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written on creation)."""
    path = Path(path)
    existing = path.read_text() if path.exists() else METRICS_HEADER
    atomic_write_text(path, existing + _format(rows))


def truncate_metrics(path: Path, last_round: int) -> None:
    """Drop every row of a round after ``last_round`` (used when resuming)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    round_position = METRIC_COLUMNS.index("round")
    kept = [line for line in body if int(next(csv.reader([line]))[round_position]) <= last_round]
    atomic_write_text(path, header + "".join(kept))


def read_metrics(path: Path):
    """Load a metrics CSV as a pandas DataFrame with typed columns."""
    import pandas as pd

    return pd.read_csv(
        path,
        dtype={"run_id": str, "method": str, "dataset": str, "partition_sha256": str, "domain": str, "split": str, "metric": str},
        keep_default_na=False,
    )
