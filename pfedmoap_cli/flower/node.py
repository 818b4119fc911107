"""The client half on a node: one client's data, state and method hooks.

A node holds exactly one client of the partition (its ``partition-id``), its
own data root and its own workspace. Its private state (pFedMoAP's gating
network and prompt, FedPer's personal half, pFedPrompt's memory, ...) is
written to that workspace after every step, in the same checkpoint files the
in-process engine writes, and never sent anywhere: a node that was down
continues from the last state it kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pfedmoap_cli.artifacts.partition import Partition, load_partition, resolve_partition_path
from pfedmoap_cli.engine.evaluation import ClientScore
from pfedmoap_cli.engine.federation import Federation
from pfedmoap_cli.engine.session import Session, open_session
from pfedmoap_cli.engine.settings import TrainSettings, run_fingerprint
from pfedmoap_cli.engine.workspace import RunPaths, Workspace
from pfedmoap_cli.errors import UserError
from pfedmoap_cli.flower.protocol import Refusal, RunInfo
from pfedmoap_cli.methods.base import ClientResult, State, get_method


@dataclass(frozen=True)
class NodeSetup:
    """Where a node keeps its data and state.

    From a SuperNode's ``--node-config`` (keys ``partition-id``, and optionally
    ``num-partitions``, ``workspace``, ``data-root``, ``partition``, ``device``,
    ``method``), with :class:`NodeSetup` defaults for the keys it leaves out.
    """

    client_id: int
    workspace: Path
    data_root: Path
    partition: str | None = None  # a path or a name in the workspace; None: its current partition
    device: str | None = None  # None: the run's --device
    method: str | None = None  # the only method this node agrees to run (None: any)
    num_partitions: int | None = None  # when given, must equal the partition's number of clients

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], defaults: "NodeSetup | None" = None) -> "NodeSetup":
        """Read a node's settings; a missing or malformed ``partition-id`` is a :class:`Refusal`."""
        raw = node_config.get("partition-id", defaults.client_id if defaults else None)
        try:
            client_id = int(raw)
        except (TypeError, ValueError):
            raise Refusal(
                f"the node has no valid client id (partition-id={raw!r}); start the SuperNode with --node-config \"partition-id=N\""
            ) from None

        def text(key: str, fallback: Any) -> Any:
            value = node_config.get(key)
            return fallback if value in (None, "") else value

        base = defaults or cls(client_id, Path("pfedmoap-workspace"), Path("data"))
        num_partitions = text("num-partitions", base.num_partitions)
        return cls(
            client_id=client_id,
            workspace=Path(str(text("workspace", base.workspace))).expanduser(),
            data_root=Path(str(text("data-root", base.data_root))).expanduser(),
            partition=text("partition", base.partition),
            device=text("device", base.device),
            method=text("method", base.method),
            num_partitions=int(num_partitions) if num_partitions is not None else None,
        )


def _short(sha: str) -> str:
    return sha[:12]


class NodeRuntime:
    """One client of one run, opened and checked on the node that holds it."""

    def __init__(self, setup: NodeSetup, run: RunInfo) -> None:
        self.setup, self.run = setup, run
        self.client_id = setup.client_id
        settings = run.settings
        try:
            get_method(settings.method)
        except UserError as error:
            raise Refusal(f"this node cannot run the server's method: {error}") from None
        if setup.method and setup.method != settings.method:
            raise Refusal(
                f"the server runs method '{settings.method}' but this node accepts only '{setup.method}' "
                f"(its --node-config method=...); restart the node with method={settings.method} or without it"
            )
        workspace = Workspace(setup.workspace)
        try:
            partition_path = resolve_partition_path(workspace.partitions_dir, setup.partition)
            partition, sha = load_partition(partition_path)
        except UserError as error:
            raise Refusal(f"this node has no usable partition: {error}") from None
        if sha != run.partition_sha256:
            raise Refusal(
                f"this node's partition {partition_path} (sha256 {_short(sha)}) is not the server's ({_short(run.partition_sha256)}); "
                "copy the server's partition file to the node and pass --node-config \"partition='PATH'\""
            )
        if not 0 <= self.client_id < partition.num_clients:
            raise Refusal(
                f"client id {self.client_id} is out of range: the partition has {partition.num_clients} clients "
                f"(ids 0..{partition.num_clients - 1}); start the SuperNode with --node-config \"partition-id=N\" in that range"
            )
        if setup.num_partitions is not None and setup.num_partitions != partition.num_clients:
            raise Refusal(
                f"the node was started for {setup.num_partitions} partitions but the partition has {partition.num_clients} clients; "
                f"fix its --node-config num-partitions"
            )
        if setup.device:
            settings = dataclasses.replace(settings, device=setup.device)
        if RunInfo.of(run.run_id, settings, sha).fingerprint != run.fingerprint:
            # The same settings hash differently here: other weights under the
            # same name, or another version of a method's option defaults.
            raise Refusal(
                f"this node's settings differ from the server's for run {run.run_id} (run fingerprint mismatch: "
                "different backbone weights or pfedmoap version); install the same pfedmoap version and weights on every node"
            )
        try:
            session = _shared_session(settings, partition, sha, setup.data_root, workspace)
        except UserError as error:
            raise Refusal(f"client {self.client_id}: {error}") from None
        self.device = session.device
        self.method = session.method
        self.federation = Federation(session, run.run_id, RunPaths(workspace.run_dir(run.run_id)), progress=False)
        self.recorder = self.federation.recorder

    # ---- the two steps of a round ------------------------------------------
    def train(self, round_index: int, download: State) -> ClientResult:
        """The client's local update of ``round_index``; its new state is saved at once."""
        download = {k: v.to(self.device) for k, v in download.items()}
        state = self.recorder.latest_client_state(self.client_id, round_index, self.device)
        result = self.federation.train_client(self.client_id, round_index, download, state)
        if result.client_state:
            self.recorder.save_client_state(round_index, self.client_id, result.client_state)
        return result

    def evaluate(self, round_index: int, download: State, trained: bool) -> ClientScore:
        """Personalise (methods that do), score the client on its own test set, save a personalised state.

        ``trained``: the server aggregated this client's update of this round;
        otherwise a state the node saved while training this round (an update
        that arrived too late) is ignored and the last kept one is used.
        """
        download = {k: v.to(self.device) for k, v in download.items()}
        state = self.recorder.client_state_of_round(round_index, self.client_id, self.device) if trained else None
        if not trained:
            # An update the server did not aggregate (its reply came too late)
            # must not become the client's state.
            self.recorder.paths.client_checkpoint(round_index, self.client_id).unlink(missing_ok=True)
        if state is None:
            state = self.recorder.latest_client_state(self.client_id, round_index, self.device)
        if self.method.personalizes:
            state = self.federation.personalize_client(self.client_id, round_index, download, state) or state
        evaluator = self.method.node_evaluator(round_index, self.client_id, download, state)
        score = self.federation.score_clients(evaluator, [self.client_id])[0]
        if state and self.method.personalizes:
            # Only a personalised state is new; a trained one was saved by the
            # train step, an untouched one is in the round where it was made,
            # so a node's files grow with its participations, not with rounds.
            self.recorder.save_client_state(round_index, self.client_id, state)
        return score


# One process may serve several nodes (a simulation's Ray worker does): the
# dataset, frozen model and test features are opened once per run and shared;
# a client's runtime on top of them is cheap.
_SESSIONS: dict[tuple, Session] = {}
_RUNTIMES: dict[tuple, NodeRuntime] = {}


def _shared_session(settings: TrainSettings, partition: Partition, sha: str, data_root: Path, workspace: Workspace) -> Session:
    key = (sha, run_fingerprint(settings, sha), settings.device, str(Path(data_root).resolve()), str(workspace.root.resolve()))
    if key not in _SESSIONS:
        _SESSIONS.clear()  # one run at a time per process: free the previous model
        _RUNTIMES.clear()
        _SESSIONS[key] = open_session(settings, partition, sha, data_root, workspace.features_cache_dir, progress=False)
    return _SESSIONS[key]


def node_runtime(setup: NodeSetup, run: RunInfo) -> NodeRuntime:
    """The node's runtime for ``run``, checked and opened once per process and node."""
    key = (setup, run.run_id, run.fingerprint, run.partition_sha256)
    if key not in _RUNTIMES:
        runtime = NodeRuntime(setup, run)
        _RUNTIMES[key] = runtime
    return _RUNTIMES[key]

