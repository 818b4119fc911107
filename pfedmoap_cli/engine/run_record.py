"""run.json (what a run is) and progress.json (how far it got)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from pfedmoap_cli import __version__
from pfedmoap_cli.artifacts.atomic import atomic_write_text
from pfedmoap_cli.engine.settings import TrainSettings, backbone_spec, settings_from_json
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.errors import ArtifactError

RUN_SCHEMA = "pfedmoap.run/1"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a run's numbers."""
    import torch

    from pfedmoap_cli.compat import import_open_clip

    return {
        "pfedmoap": __version__,
        "torch": torch.__version__,
        "open_clip": getattr(import_open_clip(), "__version__", "unknown"),
        "python": platform.python_version(),
    }


def write_run_record(paths: RunPaths, run_id: str, settings: TrainSettings, dataset: str, partition_file: Path, partition_sha256: str) -> None:
    """Write run.json: resolved settings, partition and weights identity, versions."""
    record = {
        "schema": RUN_SCHEMA,
        "run_id": run_id,
        "dataset": dataset,
        "partition_file": str(partition_file),
        "partition_sha256": partition_sha256,
        "seed": settings.seed,
        "settings": settings.to_json(),
        "weights": backbone_spec(settings).identity(),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(paths.run_json, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_run_record(paths: RunPaths) -> dict[str, Any]:
    """Read and check run.json; raise :class:`ArtifactError` when absent or malformed."""
    if not paths.run_json.is_file():
        raise ArtifactError(f"no run at {paths.root}; list runs with 'pfedmoap report' or start one with 'pfedmoap train'")
    try:
        record = json.loads(paths.run_json.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"{paths.run_json} is not valid JSON; delete the run folder and train again") from None
    if not isinstance(record, dict) or record.get("schema") != RUN_SCHEMA:
        raise ArtifactError(f"{paths.run_json} is not a {RUN_SCHEMA} record; delete the run folder and train again")
    return record


def run_settings(record: dict[str, Any]) -> TrainSettings:
    """The resolved settings stored in a run record."""
    return settings_from_json(record["settings"])


def completed_rounds(paths: RunPaths) -> int:
    """How many rounds of the run are complete (checkpoint and metrics written)."""
    if not paths.progress_json.is_file():
        return 0
    try:
        return int(json.loads(paths.progress_json.read_text())["completed_rounds"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ArtifactError(f"{paths.progress_json} is corrupt; delete it to restart the run from round 0") from None


def mark_round_complete(paths: RunPaths, rounds_done: int, total_rounds: int) -> None:
    """Record that ``rounds_done`` rounds are complete; written last in a round."""
    atomic_write_text(
        paths.progress_json,
        json.dumps({"completed_rounds": rounds_done, "total_rounds": total_rounds, "finished": rounds_done >= total_rounds}) + "\n",
    )
