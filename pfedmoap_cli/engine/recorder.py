"""What a run writes about its rounds: metric rows and checkpoints.

Shared by every runtime (the in-process :class:`~pfedmoap_cli.engine.federation.Federation`,
the Flower server and the Flower nodes), so a run's files are the same
whichever runtime wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from pfedmoap_cli.artifacts.checkpoint import CheckpointIdentity, load_checkpoint, save_checkpoint
from pfedmoap_cli.artifacts.manifest import RoundManifest, read_round_manifest, verify_client_states, verify_round, write_round_manifest
from pfedmoap_cli.artifacts.metrics import MetricRow, format_metric_rows
from pfedmoap_cli.artifacts.partition import Partition
from pfedmoap_cli.engine.evaluation import ClientScore
from pfedmoap_cli.engine.retention import prune_rounds
from pfedmoap_cli.engine.settings import TrainSettings, keep_rounds_count
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.methods.base import ClientResult, State

#: The metric recorded (value 1.0) for a client that did not answer in a round:
#: split "train" for a participant whose update never arrived, "test" for a
#: client that could not be scored.
MISSING_METRIC = "missing"


def to_device(state: Mapping[str, torch.Tensor], device: torch.device | str) -> State:
    """A copy of ``state`` with every tensor on ``device``."""
    return {k: v.to(device) for k, v in state.items()}


@dataclass(frozen=True)
class RunRecorder:
    """Writes (and reads back) one run's metric rows and checkpoints."""

    run_id: str
    settings: TrainSettings
    partition: Partition
    partition_sha256: str
    paths: RunPaths

    # ---- metrics ---------------------------------------------------------
    def row(self, round_index: int, client_id: int, split: str, metric: str, value: float, count: int) -> MetricRow:
        """One long-format metric row of this run."""
        return MetricRow(
            run_id=self.run_id,
            method=self.settings.method,
            dataset=self.partition.dataset,
            partition_sha256=self.partition_sha256,
            seed=self.settings.seed,
            round=round_index,
            client_id=client_id,
            domain=self.partition.clients[client_id].domain or "",
            split=split,
            metric=metric,
            value=value,
            num_examples=count,
        )

    def metric_rows(
        self,
        round_index: int,
        scores: Iterable[ClientScore],
        results: Mapping[int, ClientResult],
        missing_train: Iterable[int] = (),
        missing_test: Iterable[int] = (),
        generalisation: Mapping[str, Iterable[ClientScore]] | None = None,
    ) -> list[MetricRow]:
        """Rows for one round: test metrics of every client scored, train metrics of participants, missing clients.

        ``generalisation`` maps a split (``"base"``, ``"novel"``) to every
        client's score on it (base-to-novel runs); each gives an accuracy and
        a loss row, after the test rows.
        """
        rows = []
        for score in scores:
            rows.append(self.row(round_index, score.client_id, "test", "accuracy", score.accuracy, score.num_examples))
            rows.append(self.row(round_index, score.client_id, "test", "loss", score.loss, score.num_examples))
            for name, value in sorted(score.extra.items()):
                rows.append(self.row(round_index, score.client_id, "test", name, value, score.num_examples))
        for split, split_scores in (generalisation or {}).items():
            for score in split_scores:
                rows.append(self.row(round_index, score.client_id, split, "accuracy", score.accuracy, score.num_examples))
                rows.append(self.row(round_index, score.client_id, split, "loss", score.loss, score.num_examples))
        for client_id in sorted(results):
            result = results[client_id]
            rows.append(self.row(round_index, client_id, "train", "loss", result.train_loss, result.num_examples))
            rows.append(self.row(round_index, client_id, "train", "bytes_down", float(result.bytes_down), result.num_examples))
            rows.append(self.row(round_index, client_id, "train", "bytes_up", float(result.bytes_up), result.num_examples))
        for split, clients in (("train", missing_train), ("test", missing_test)):
            for client_id in sorted(clients):
                rows.append(self.row(round_index, client_id, split, MISSING_METRIC, 1.0, 0))
        return rows

    # ---- checkpoints -----------------------------------------------------
    def _metadata(self, round_index: int, client: str) -> dict[str, str]:
        settings = self.settings
        return {
            "method": settings.method,
            "round": str(round_index),
            "client_id": client,
            "backbone": settings.backbone,
            "pretrained": settings.pretrained,
            "partition_sha256": self.partition_sha256,
            "run_id": self.run_id,
        }

    def save_server_state(self, round_index: int, server_state: State) -> None:
        """Write the server checkpoint of a round."""
        save_checkpoint(self.paths.global_checkpoint(round_index), server_state, self._metadata(round_index, "server"))

    def save_client_state(self, round_index: int, client_id: int, state: State) -> None:
        """Write one client's checkpoint of a round (where that client's state lives)."""
        save_checkpoint(self.paths.client_checkpoint(round_index, client_id), state, self._metadata(round_index, str(client_id)))

    def identity(self, round_index: int, client: str) -> CheckpointIdentity:
        """What the metadata of this run's checkpoint of ``round_index`` and ``client`` must say."""
        return CheckpointIdentity(self.run_id, round_index, client, self.settings.method)

    def load_server_state(self, round_index: int, device: torch.device | str) -> State:
        """The server checkpoint of a complete round (its metadata checked against where it lies)."""
        tensors, _ = load_checkpoint(self.paths.global_checkpoint(round_index), self.identity(round_index, "server"))
        return to_device(tensors, device)

    def load_client_states(self, round_index: int, device: torch.device | str) -> dict[int, State]:
        """Every client's state after a complete round, by client id, found through the round's manifest.

        A client's state lies in the folder of the round that last wrote it;
        each file is checked against the hash the manifest recorded and its
        metadata against that round and client.
        """
        manifest = read_round_manifest(self.paths.round_dir(round_index))
        checkpoints = self.paths.root / "checkpoints"
        verify_client_states(checkpoints, manifest)
        clients: dict[int, State] = {}
        for client_id, ref in sorted(manifest.client_states.items()):
            path = checkpoints / ref.file
            tensors, _ = load_checkpoint(path, self.identity(ref.round, str(client_id)))
            clients[client_id] = to_device(tensors, device)
        return clients

    def client_state_of_round(self, round_index: int, client_id: int, device: torch.device | str) -> State | None:
        """The client's checkpoint of exactly ``round_index`` (None if there is none).

        On a node there is no manifest to check it against (the server's covers
        the server's files only), so at least its metadata must match.
        """
        path = self.paths.client_checkpoint(round_index, client_id)
        if not path.is_file():
            return None
        tensors, _ = load_checkpoint(path, self.identity(round_index, str(client_id)))
        return to_device(tensors, device)

    # ---- manifests -------------------------------------------------------
    @property
    def keep_rounds(self) -> int | None:
        """How many of the last rounds keep their checkpoints (None: all), per ``--keep-rounds``."""
        return keep_rounds_count(self.settings.keep_rounds)

    def write_manifest(self, round_index: int, rows: Iterable[MetricRow]) -> RoundManifest:
        """Seal a round: hash its checkpoint files and keep its metric rows (after both are written).

        Clients without a file in the round keep the state the previous
        round's manifest points to.
        """
        previous = read_round_manifest(self.paths.round_dir(round_index - 1)) if round_index > 0 else None
        return write_round_manifest(
            self.paths.round_dir(round_index), self.run_id, round_index, self.settings.method, format_metric_rows(rows),
            previous, self.keep_rounds,
        )

    def prune(self, completed: int) -> list[Path]:
        """Delete the checkpoints ``--keep-rounds`` no longer keeps; call after ``completed`` rounds are marked complete."""
        return prune_rounds(self.paths, completed, self.keep_rounds)

    def verify_round(self, round_index: int, complete: bool = True) -> RoundManifest:
        """The round's manifest, after checking every file of the round folder against it.

        ``complete=False``: files ``--keep-rounds`` deleted may be absent.
        """
        return verify_round(self.paths.round_dir(round_index), self.run_id, round_index, self.settings.method, complete)

    def latest_client_state(self, client_id: int, before_round: int, device: torch.device | str) -> State | None:
        """The client's newest checkpoint of a round before ``before_round`` (None if none).

        A client that missed rounds (its node was down) continues from the last
        state it kept.
        """
        for round_index in range(before_round - 1, -1, -1):
            state = self.client_state_of_round(round_index, client_id, device)
            if state is not None:
                return state
        return None
