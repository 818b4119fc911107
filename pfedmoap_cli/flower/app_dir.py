"""Write a Flower app directory for a real deployment (``flwr run DIR <superlink>``).

The app holds no code: its components are the installed package's
``pfedmoap_cli.flower.server_app:app`` and ``pfedmoap_cli.flower.client_app:app``
(install pfedmoap with the ``flower`` extra on the server and on every node).
Its run config carries the resolved settings, so every host runs exactly the
run the user configured here.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import tomli_w

from pfedmoap_cli.artifacts.atomic import atomic_write_text
from pfedmoap_cli.engine.settings import TrainSettings
from pfedmoap_cli.engine.workspace import Workspace
from pfedmoap_cli.flower.server import FlowerOptions

APP_FILE = "pyproject.toml"


def app_document(workspace: Workspace, partition_path: Path, settings: TrainSettings, run_id: str, round_timeout: float) -> dict:
    """The pyproject.toml of the app, as a TOML document."""
    defaults = FlowerOptions()
    return {
        "project": {
            "name": "pfedmoap-federation",
            "version": "1.0.0",
            "license": "MIT",
            "description": f"pfedmoap: {settings.method} on Flower (written by 'pfedmoap train --write-flower-app')",
            "dependencies": [],  # pfedmoap[flower] is installed on every host; nothing is installed at run time
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "pfedmoap",
                    "components": {
                        "serverapp": "pfedmoap_cli.flower.server_app:app",
                        "clientapp": "pfedmoap_cli.flower.client_app:app",
                    },
                    "config": {
                        "workspace": str(workspace.root.resolve()),
                        "partition": str(Path(partition_path).resolve()),
                        "settings": json.dumps(settings.to_json(), sort_keys=True),
                        "run-id": run_id,
                        "round-timeout": float(round_timeout),
                        "join-timeout": float(defaults.join_timeout),
                        "query-timeout": float(defaults.query_timeout),
                    },
                }
            }
        },
    }


def write_flower_app(directory: Path, workspace: Workspace, partition_path: Path, settings: TrainSettings, run_id: str, round_timeout: float) -> Path:
    """Write the app's pyproject.toml into ``directory`` (created if needed); return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / APP_FILE
    atomic_write_text(path, tomli_w.dumps(app_document(workspace, partition_path, settings, run_id, round_timeout)))
    return path


def deployment_instructions(directory: Path, num_clients: int) -> str:
    """What to run next (three processes on one machine; README "Running across machines" has real hosts)."""
    app = shlex.quote(str(Path(directory).resolve()))
    return "\n".join(
        [
            "next (pfedmoap[flower] installed on every host; README: 'Running across machines'):",
            "  flower-superlink --insecure --host 127.0.0.1 --port 9093          # loopback only; real hosts use TLS",
            f"  flower-supernode --insecure --superlink 127.0.0.1:9093 --port 910N --node-config \"partition-id=N workspace='NODE_WS' data-root='DATA'\"   # N = 0..{num_clients - 1}",
            "  # $FLWR_HOME/config.toml (default ~/.flwr): [superlink.loopback] address = \"127.0.0.1:9093\"  insecure = true",
            f"  flwr run {app} loopback --stream",
        ]
    )
