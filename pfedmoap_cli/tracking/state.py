"""``runs/<id>/tracking.json``: which tracker run continues this run, and how far it was logged.

::

    {"schema": "pfedmoap.tracking/1",
     "trackers": {"mlflow": {"run_id": "...", "experiment_id": "...", "tracking_uri": "...", "logged_rounds": 3},
                  "tensorboard": {"log_dir": "tensorboard", "logged_rounds": 3}}}

``logged_rounds`` counts the rounds 0..n-1 the tracker has been sent. The file is
replaced atomically after each logged round, so a crash leaves the last good copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pfedmoap_cli.artifacts.atomic import atomic_write_text
from pfedmoap_cli.errors import ArtifactError

STATE_NAME = "tracking.json"
STATE_SCHEMA = "pfedmoap.tracking/1"


def state_path(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_NAME


def read_trackers(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each tracker's entry (empty when the run was never tracked)."""
    path = state_path(run_dir)
    if not path.is_file():
        return {}
    try:
        body = json.loads(path.read_text())
        trackers = body["trackers"]
        if body.get("schema") != STATE_SCHEMA or not isinstance(trackers, dict):
            raise ValueError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise ArtifactError(f"{path} is corrupt; delete it to start new tracker runs for this run") from None
    return trackers


def read_tracker(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The entry of tracker ``name``, or None."""
    entry = read_trackers(run_dir).get(name)
    return dict(entry) if isinstance(entry, dict) else None


def write_tracker(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Replace tracker ``name``'s entry (the others are kept)."""
    trackers = read_trackers(run_dir)
    trackers[name] = entry
    body = {"schema": STATE_SCHEMA, "trackers": trackers}
    atomic_write_text(state_path(run_dir), json.dumps(body, indent=1, sort_keys=True) + "\n")
