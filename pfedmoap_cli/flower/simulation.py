"""``--engine flower``: a run on Flower's simulation runtime (one virtual SuperNode per client).

The server half runs in this process (a ServerApp thread of the simulation),
each client's ClientApp in a Ray worker. Every virtual node uses the run's
workspace and data root, so the run folder holds exactly what the in-process
engine writes (metrics, server and client checkpoints, progress).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pfedmoap_cli.engine.runner import RunJob, Trainer
from pfedmoap_cli.engine.session import build_method, open_partition_dataset
from pfedmoap_cli.errors import FederationError
from pfedmoap_cli.flower import require_flower
from pfedmoap_cli.flower.server import FlowerOptions


def simulation_options(round_timeout: float = FlowerOptions.round_timeout) -> FlowerOptions:
    """A simulation's server options: every virtual node runs on this machine,
    so a failed step is sent once more and a client that still fails stops
    the run (with the node's reason) instead of becoming a silent missing row.
    Every virtual node exists from the start, so the start waits for the
    handshake once, no longer than a step, and a node that has not answered
    by then stops the run with one line (Ray started no worker for it)."""
    query_timeout = min(FlowerOptions.query_timeout, round_timeout)
    return FlowerOptions(
        round_timeout=round_timeout, query_timeout=query_timeout, join_timeout=query_timeout, retries=1, require_every_client=True
    )


@contextlib.contextmanager
def flower_log_to(path: Path, debug: bool = False) -> Iterator[None]:
    """Flower's log goes to ``path`` (appended) while the simulation runs, and
    to the screen only with ``debug``: its INFO lines and the remote
    tracebacks of failed steps would bury the run's progress, but a run that
    stalls or fails must leave them somewhere to read."""
    logger = logging.getLogger("flwr")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(threadName)s] %(message)s"))
    screens = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
    before = (logger.level, [h.level for h in screens])
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    handler.setLevel(logger.level)
    logger.addHandler(handler)
    if not debug:
        for screen in screens:
            screen.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(before[0])
        for screen, level in zip(screens, before[1]):
            screen.setLevel(level)


def ray_logs_folder() -> str | None:
    """The log folder of this process's Ray instance (its workers' stderr, the raylet's log), if one is up.

    Read through a private attribute of Ray, guarded: where a later Ray moves
    it, the hint is only left out."""
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001
        return str(Path(node.get_session_dir_path()) / "logs") if node is not None else None
    except Exception:  # noqa: BLE001 - a hint, never a new failure
        return None


def with_log_hint(error: Exception, log: Path, ray_logs: str | None = None) -> Exception:
    """A server's :class:`FederationError` with where Flower's (and Ray's) logs of the run are; other errors as they are."""
    if isinstance(error, FederationError):
        where = f"Flower's log: {log}" + (f"; Ray's logs: {ray_logs}" if ray_logs else "")
        return FederationError(f"{error} ({where})")
    return error


@dataclass(frozen=True)
class FlowerSimulationRuntime:
    """Runs the rounds on Flower's simulation runtime (Ray), ``cpus_per_client`` cores per virtual node."""

    options: FlowerOptions = field(default_factory=simulation_options)
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
            failed: list[Exception] = []  # ... or what it raised
            ray_logs: list[str | None] = [None]  # where Ray logged, read while it is still up

            def serve(grid) -> None:
                server = FlowerServer(grid, method, run, job.partition, job.paths, self.options, progress=job.progress)
                try:
                    done.append(server.run(stop_after=stop_after, on_round=on_round))
                except Exception as error:
                    failed.append(error)
                    ray_logs[0] = ray_logs_folder()
                    raise

            server_app = make_server_app(serve)
            defaults = NodeSetup(0, job.workspace.root.resolve(), job.data_root.resolve(), partition=str(job.partition_path.resolve()))
            # Ray workers inherit these; without a cap each would start one
            # thread per core and N workers would oversubscribe the machine.
            os.environ.setdefault("OMP_NUM_THREADS", str(max(int(self.cpus_per_client), 1)))
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            debug = bool(os.environ.get("PFEDMOAP_DEBUG"))
            try:
                with flower_log_to(job.paths.flower_log, debug):
                    run_simulation(
                        server_app=server_app,
                        client_app=make_client_app(defaults),
                        num_supernodes=job.partition.num_clients,
                        backend_config={
                            "client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": 0.0},
                            "init_args": {
                                # always a new Ray instance of this run's own: never one that
                                # RAY_ADDRESS or /tmp/ray/ray_current_cluster (a `ray start`)
                                # points to, whose workers may lack this environment or be busy
                                "address": "local",
                                "num_cpus": max(os.cpu_count() or 1, int(self.cpus_per_client)),
                                "include_dashboard": False,
                                "log_to_driver": debug,
                                # the virtual nodes talk over loopback only: no firewall or
                                # closed network between Ray's own processes on this machine
                                "_node_ip_address": "127.0.0.1",
                            },
                        },
                    )
            except Exception as error:
                if failed:  # the server's own error (a FederationError names its fix), not Flower's wrapper
                    raise with_log_hint(failed[0], job.paths.flower_log, ray_logs[0]) from None
                raise FederationError(
                    f"Flower's simulation runtime failed ({str(error).strip() or type(error).__name__}); "
                    f"its log is {job.paths.flower_log}; PFEDMOAP_DEBUG=1 shows it on the screen"
                ) from error
            if failed:
                raise with_log_hint(failed[0], job.paths.flower_log, ray_logs[0])
            return done[0] if done else 0

        return train

