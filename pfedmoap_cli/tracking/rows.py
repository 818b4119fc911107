"""A complete round's metric rows, read back from its manifest (what the round sealed)."""

from __future__ import annotations

import csv
import io

from pfedmoap_cli.artifacts.manifest import read_round_manifest
from pfedmoap_cli.artifacts.metrics import METRIC_COLUMNS, MetricRow
from pfedmoap_cli.engine.workspace import RunPaths

_INTS = {"seed", "round", "client_id", "num_examples"}


def parse_rows(lines: str) -> list[MetricRow]:
    """``MetricRow`` objects from metrics.csv lines without the header (as a manifest keeps them)."""
    rows = []
    for fields in csv.reader(io.StringIO(lines)):
        if not fields:
            continue
        values = dict(zip(METRIC_COLUMNS, fields))
        typed = {k: int(v) if k in _INTS else float(v) if k == "value" else v for k, v in values.items()}
        rows.append(MetricRow(**typed))
    return rows


def round_rows(paths: RunPaths, round_index: int) -> list[MetricRow]:
    """The rows of a complete round, from ``checkpoints/round-NNNN/manifest.json`` (its hash checked)."""
    return parse_rows(read_round_manifest(paths.round_dir(round_index)).metrics)
