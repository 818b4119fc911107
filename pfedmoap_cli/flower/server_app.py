"""The ServerApp: the federation's server half, in a simulation or a real deployment.

``app`` is the ServerApp a SuperLink runs (``pfedmoap_cli.flower.server_app:app``).
It reads the run from the app's run config (written by
``pfedmoap train --engine flower --write-flower-app DIR``):

``workspace``      the server's workspace (run folders are written there);
``partition``      the partition file (path, or name in the workspace);
``settings``       the resolved training settings, as JSON;
``run-id``         the run's name ("" for the id derived from its settings);
``round-timeout``  seconds to wait for the nodes' replies in each step of a round;
``join-timeout``   seconds to wait before round 0 for every client to have a node.

Running the app again with the same config resumes the run after its last
complete round (the nodes keep their state on their own disks).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pfedmoap_cli.artifacts.atomic import atomic_write_text
from pfedmoap_cli.artifacts.partition import resolve_partition_path
from pfedmoap_cli.engine.runner import IfExists, RunJob, Trainer, execute_run
from pfedmoap_cli.engine.session import build_method
from pfedmoap_cli.engine.settings import settings_from_json, validate_settings
from pfedmoap_cli.engine.workspace import Workspace
from pfedmoap_cli.errors import ConfigError, UserError
from pfedmoap_cli.flower.protocol import RunInfo
from pfedmoap_cli.flower.server import FlowerOptions, FlowerServer


def make_server_app(main: Callable[[Grid], None]) -> ServerApp:
    """A ServerApp that runs ``main(grid)``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid)

    return app


@dataclass(frozen=True)
class FlowerGridRuntime:
    """Runs a run's rounds over an existing Flower grid (a deployment's SuperLink)."""

    grid: Grid
    options: FlowerOptions = FlowerOptions()
    #: Client states stay on the SuperNodes (the run folder is marked so).
    clients_on_nodes: ClassVar[bool] = True

    def open(self, job: RunJob) -> Trainer:
        _, method = build_method(job.settings, job.partition)
        # Re-scoring or resuming in one process would find no client states here
        # and silently score every client as never trained: mark the run.
        atomic_write_text(
            job.paths.clients_on_nodes,
            json.dumps({"client_states": "on the SuperNodes, under each node's workspace/runs/" + job.run_id}) + "\n",
        )
        run = RunInfo.of(job.run_id, job.settings, job.partition_sha256)
        server = FlowerServer(self.grid, method, run, job.partition, job.paths, self.options, progress=job.progress)
        return lambda stop_after, on_round: server.run(stop_after=stop_after, on_round=on_round)


@dataclass(frozen=True)
class DeploymentConfig:
    """The run config of a deployed app (see the module docstring)."""

    workspace: Path
    partition: str
    settings_json: str
    run_id: str
    options: FlowerOptions

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> "DeploymentConfig":
        missing = [key for key in ("workspace", "settings") if not str(config.get(key, ""))]
        if missing:
            raise ConfigError(
                f"the app's run config lacks {missing}; write the app with 'pfedmoap train --engine flower --write-flower-app DIR'"
            )
        defaults = FlowerOptions()
        return cls(
            workspace=Path(str(config["workspace"])).expanduser(),
            partition=str(config.get("partition", "")),
            settings_json=str(config["settings"]),
            run_id=str(config.get("run-id", "")),
            options=FlowerOptions(
                round_timeout=float(config.get("round-timeout", defaults.round_timeout)),
                join_timeout=float(config.get("join-timeout", defaults.join_timeout)),
                query_timeout=float(config.get("query-timeout", defaults.query_timeout)),
            ),
        )


def run_deployment(grid: Grid, run_config: Mapping[str, Any]) -> None:
    """Start or resume the configured run over ``grid``; user errors become one line on stderr."""
    try:
        config = DeploymentConfig.from_run_config(run_config)
        try:
            settings = validate_settings(settings_from_json(json.loads(config.settings_json)))
        except json.JSONDecodeError:
            raise ConfigError("the app's run config 'settings' is not JSON; write the app again with --write-flower-app") from None
        workspace = Workspace(config.workspace)
        partition_path = resolve_partition_path(workspace.partitions_dir, config.partition or None)
        outcome = execute_run(
            workspace,
            workspace.root,  # the server never opens the data: every client's data stays on its node
            settings,
            partition_path,
            run_id=config.run_id or None,
            if_exists=IfExists.AUTO,
            progress=True,
            runtime=FlowerGridRuntime(grid, config.options),
        )
    except UserError as error:
        print(f"pfedmoap server: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"pfedmoap server: run {outcome.run_id}: {outcome.completed_rounds}/{outcome.total_rounds} rounds complete", file=sys.stderr, flush=True)


#: The ServerApp a SuperLink runs (``[tool.flwr.app.components] serverapp``).
app = ServerApp()


@app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    run_deployment(grid, context.run_config)
