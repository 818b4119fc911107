"""``--engine flower``: a run on Flower's simulation runtime (one virtual SuperNode per client).

The server half runs in this process (a ServerApp thread of the simulation),
each client's ClientApp in a Ray worker. Every virtual node uses the run's
workspace and data root, so the run folder holds exactly what the in-process
engine writes (metrics, server and client checkpoints, progress).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pfedmoap_cli.engine.runner import RunJob, Trainer
from pfedmoap_cli.engine.session import build_method, open_partition_dataset
from pfedmoap_cli.flower import require_flower
from pfedmoap_cli.flower.server import FlowerOptions


@dataclass(frozen=True)
class FlowerSimulationRuntime:
    """Runs the rounds on Flower's simulation runtime (Ray), ``cpus_per_client`` cores per virtual node."""

    options: FlowerOptions = FlowerOptions()
    cpus_per_client: float = 1.0

    def open(self, job: RunJob) -> Trainer:
        require_flower()
        open_partition_dataset(job.partition, job.data_root)  # refuse changed data before Ray starts
        _, method = build_method(job.settings, job.partition)  # option and backbone errors, here

        def train(stop_after, on_round) -> int:
            from flwr.simulation import run_simulation

            from pfedmoap_cli.flower.client_app import make_client_app
            from pfedmoap_cli.flower.node import NodeSetup
            from pfedmoap_cli.flower.protocol import RunInfo
            from pfedmoap_cli.flower.server import FlowerServer
            from pfedmoap_cli.flower.server_app import make_server_app

            run = RunInfo.of(job.run_id, job.settings, job.partition_sha256)
            done: list[int] = []  # the server thread's return value

            def serve(grid) -> None:
                server = FlowerServer(grid, method, run, job.partition, job.paths, self.options, progress=job.progress)
                done.append(server.run(stop_after=stop_after, on_round=on_round))

            server_app = make_server_app(serve)
            defaults = NodeSetup(0, job.workspace.root.resolve(), job.data_root.resolve(), partition=str(job.partition_path.resolve()))
            # Ray workers inherit these; without a cap each would start one
            # thread per core and N workers would oversubscribe the machine.
            os.environ.setdefault("OMP_NUM_THREADS", str(max(int(self.cpus_per_client), 1)))
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            if not os.environ.get("PFEDMOAP_DEBUG"):
                # Flower's own log (a deprecation notice, debug lines) would bury the
                # run's progress; PFEDMOAP_DEBUG=1 shows it.
                logging.getLogger("flwr").setLevel(logging.ERROR)
            run_simulation(
                server_app=server_app,
                client_app=make_client_app(defaults),
                num_supernodes=job.partition.num_clients,
                backend_config={
                    "client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": 0.0},
                    "init_args": {"num_cpus": max(os.cpu_count() or 1, int(self.cpus_per_client)), "include_dashboard": False},
                },
            )
            return done[0] if done else 0

        return train

