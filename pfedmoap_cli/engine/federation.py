"""The round loop: sampling, local updates, aggregation, evaluation, checkpoints, resume.

One round t (PROTOCOL.md sections 3 and 4):

1. sample the participants (seeded by the experiment seed and t);
2. snapshot the server state; every participant trains from that snapshot and
   its own state, with data order and augmentation seeded by (seed, t, client),
   so the order in which clients run cannot change any number;
3. the method aggregates the uploads into the new server state;
4. every client is scored on its own test set;
5. metrics rows, the server checkpoint and every client checkpoint are written,
   and only then is the round marked complete. ``resume`` restarts after the
   last complete round and reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from pfedmoap_cli.artifacts.checkpoint import load_checkpoint, save_checkpoint
from pfedmoap_cli.artifacts.metrics import MetricRow, append_metrics, truncate_metrics
from pfedmoap_cli.engine.client_data import ClientTrainImages, epoch_batches, ordered_batches
from pfedmoap_cli.engine.evaluation import ClientScore, score_client
from pfedmoap_cli.engine.run_record import completed_rounds, mark_round_complete
from pfedmoap_cli.seeding import derive_seed, sample_clients, torch_generator
from pfedmoap_cli.engine.session import Session
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.errors import DataError
from pfedmoap_cli.methods.base import ClientJob, ClientResult, RoundView, State


@dataclass(frozen=True)
class RoundSummary:
    """What a finished round reports back (for progress bars and callers)."""

    round_index: int
    participants: tuple[int, ...]
    mean_accuracy: float


def _clone_state(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def _to_device(state: Mapping[str, torch.Tensor], device: torch.device) -> State:
    return {k: v.to(device) for k, v in state.items()}


class Federation:
    """Runs (or resumes, or re-evaluates) one federated training run."""

    def __init__(self, session: Session, run_id: str, paths: RunPaths, progress: bool = True) -> None:
        self.session = session
        self.run_id = run_id
        self.paths = paths
        self.progress = progress
        self.settings = session.settings
        self.method = session.method
        self.partition = session.partition
        self.num_clients = session.partition.num_clients
        self.train_transform = session.clip.train_transform()
        self.test_transform = session.clip.test_transform()

    # ---- state -----------------------------------------------------------
    def initial_state(self) -> State:
        """The server state before round 0 (seeded, so evaluate can rebuild it)."""
        return _to_device(self.method.initial_server_state(torch_generator(self.settings.seed, "init")), self.session.device)

    def _checkpoint_metadata(self, round_index: int, client: str) -> dict[str, str]:
        settings = self.settings
        return {
            "method": settings.method,
            "round": str(round_index),
            "client_id": client,
            "backbone": settings.backbone,
            "pretrained": settings.pretrained,
            "partition_sha256": self.session.partition_sha256,
            "run_id": self.run_id,
        }

    def save_round(self, round_index: int, server_state: State, client_states: Mapping[int, State]) -> None:
        """Write the server checkpoint and one checkpoint per client with state."""
        save_checkpoint(self.paths.global_checkpoint(round_index), server_state, self._checkpoint_metadata(round_index, "server"))
        for client_id, state in client_states.items():
            save_checkpoint(
                self.paths.client_checkpoint(round_index, client_id), state, self._checkpoint_metadata(round_index, str(client_id))
            )

    def load_round(self, round_index: int) -> tuple[State, dict[int, State]]:
        """Read the checkpoints of a complete round back (on this run's device)."""
        device = self.session.device
        server, _ = load_checkpoint(self.paths.global_checkpoint(round_index))
        clients: dict[int, State] = {}
        for path in sorted(self.paths.round_dir(round_index).glob("client-*.safetensors")):
            tensors, meta = load_checkpoint(path)
            clients[int(meta["client_id"])] = _to_device(tensors, device)
        return _to_device(server, device), clients

    # ---- one client ------------------------------------------------------
    def client_job(self, client_id: int, round_index: int, server_state: State, client_state: State | None, stream: str = "") -> ClientJob:
        """A client's job with its own seeds: shuffle, augmentation and method draws.

        ``stream`` separates the random streams of different local trainings of
        one client in one round ("" for the round's local update, "personalize"
        for a method's post-aggregation fine-tuning), so neither shifts the other.
        """
        seed = self.settings.seed
        tags = (stream,) if stream else ()
        # Augmentation draws from the global torch RNG; seeding it per client
        # makes the update independent of which clients ran before.
        torch.manual_seed(derive_seed(seed, "augment", *tags, round_index, client_id))
        client = self.partition.clients[client_id]
        dataset = ClientTrainImages(self.session.source, self.session.train_samples, client.train, self.train_transform)
        plain = ClientTrainImages(self.session.source, self.session.train_samples, client.train, self.test_transform)
        return ClientJob(
            client_id=client_id,
            round_index=round_index,
            server_state=server_state,
            client_state=client_state,
            batches=epoch_batches(
                dataset,
                self.settings.batch_size,
                torch_generator(seed, "shuffle", *tags, round_index, client_id),
                self.session.device,
                self.settings.num_workers,
            ),
            num_examples=len(dataset),
            generator=torch_generator(seed, "method", *tags, round_index, client_id),
            plain_batches=ordered_batches(plain, self.settings.eval_batch_size, self.session.device, self.settings.num_workers),
        )

    def train_client(self, client_id: int, round_index: int, server_state: State, client_state: State | None) -> ClientResult:
        """One client's local update with its own seeds."""
        return self.method.train_client(self.client_job(client_id, round_index, server_state, client_state))

    def personalize(self, round_index: int, server_state: State, client_states: dict[int, State]) -> dict[int, State]:
        """Every client's post-aggregation personal state (methods with :attr:`personalizes`)."""
        updated = dict(client_states)
        for client_id in tqdm(range(self.num_clients), desc=f"round {round_index} fine-tuning", leave=False, disable=not self.progress):
            job = self.client_job(client_id, round_index, server_state, client_states.get(client_id), stream="personalize")
            state = self.method.personalize_client(job)
            if state:
                updated[client_id] = state
        return updated

    # ---- evaluation ------------------------------------------------------
    def evaluate(self, view: RoundView) -> list[ClientScore]:
        """Score every client on its own test set."""
        evaluator = self.method.evaluator(view)
        scores = []
        for client in self.partition.clients:
            if not client.test:
                # Partitions refuse empty test sets when they are built and loaded;
                # skipping one here would average over fewer clients unnoticed.
                raise DataError(
                    f"client {client.client_id} of the partition has no test samples; "
                    "re-create the partition with 'pfedmoap partition' (a larger --min-size or fewer clients)"
                )
            index = torch.tensor(client.test, dtype=torch.long, device=self.session.device)
            scores.append(
                score_client(
                    evaluator, client.client_id, self.session.test_features[index], self.session.test_labels[index], self.settings.eval_batch_size
                )
            )
        return scores

    def metric_rows(self, round_index: int, scores: list[ClientScore], results: Mapping[int, ClientResult]) -> list[MetricRow]:
        """Long-format rows for one round: test metrics of all, train metrics of participants."""
        settings, partition = self.settings, self.partition

        def row(client_id: int, split: str, metric: str, value: float, count: int) -> MetricRow:
            return MetricRow(
                run_id=self.run_id,
                method=settings.method,
                dataset=partition.dataset,
                partition_sha256=self.session.partition_sha256,
                seed=settings.seed,
                round=round_index,
                client_id=client_id,
                domain=partition.clients[client_id].domain or "",
                split=split,
                metric=metric,
                value=value,
                num_examples=count,
            )

        rows = []
        for score in scores:
            rows.append(row(score.client_id, "test", "accuracy", score.accuracy, score.num_examples))
            rows.append(row(score.client_id, "test", "loss", score.loss, score.num_examples))
            for name, value in sorted(score.extra.items()):
                rows.append(row(score.client_id, "test", name, value, score.num_examples))
        for client_id in sorted(results):
            result = results[client_id]
            rows.append(row(client_id, "train", "loss", result.train_loss, result.num_examples))
            rows.append(row(client_id, "train", "bytes_down", float(result.bytes_down), result.num_examples))
            rows.append(row(client_id, "train", "bytes_up", float(result.bytes_up), result.num_examples))
        return rows

    # ---- the loop --------------------------------------------------------
    def run(self, stop_after: int | None = None, on_round: Callable[[RoundSummary], None] | None = None) -> int:
        """Train from the last complete round to the end; return rounds completed.

        ``stop_after`` ends the call after that many rounds in total (used to
        simulate an interruption in tests); the run can then be resumed.
        """
        total = self.settings.rounds
        done = completed_rounds(self.paths)
        if done > 0:
            server_state, client_states = self.load_round(done - 1)
            truncate_metrics(self.paths.metrics_csv, done - 1)
        else:
            server_state, client_states = self.initial_state(), {}
            if self.paths.metrics_csv.exists():
                self.paths.metrics_csv.unlink()
        end = total if stop_after is None else min(total, stop_after)
        rounds = tqdm(range(done, end), desc=f"{self.settings.method} rounds", disable=not self.progress, initial=done, total=total)
        for round_index in rounds:
            server_state, client_states, summary = self.run_round(round_index, server_state, client_states)
            rounds.set_postfix(acc=f"{summary.mean_accuracy:.3f}")
            if on_round is not None:
                on_round(summary)
        return max(done, end)

    def run_round(self, round_index: int, server_state: State, client_states: dict[int, State]):
        """One complete round, persisted; returns the new states and a summary."""
        participants = sample_clients(self.num_clients, self.settings.frac, self.settings.seed, round_index)
        start_state = _clone_state(server_state)
        results: dict[int, ClientResult] = {}
        if self.method.trains:
            self.method.prepare_round(round_index, start_state, tuple(participants))
            for client_id in tqdm(participants, desc=f"round {round_index} clients", leave=False, disable=not self.progress):
                results[client_id] = self.train_client(client_id, round_index, start_state, client_states.get(client_id))
        # States change only after every participant has trained (order independence).
        new_client_states = dict(client_states)
        for client_id, result in results.items():
            if result.client_state:  # empty states are not kept, exactly as after a resume
                new_client_states[client_id] = result.client_state
        new_server_state = self.method.aggregate(start_state, results, round_index) if results else start_state
        if self.method.personalizes:
            new_client_states = self.personalize(round_index, new_server_state, new_client_states)
        view = RoundView(round_index, frozenset(participants), start_state, new_server_state, new_client_states)
        scores = self.evaluate(view)
        append_metrics(self.paths.metrics_csv, self.metric_rows(round_index, scores, results))
        self.save_round(round_index, new_server_state, new_client_states)
        mark_round_complete(self.paths, round_index + 1, self.settings.rounds)
        mean = sum(s.accuracy for s in scores) / max(len(scores), 1)
        return new_server_state, new_client_states, RoundSummary(round_index, tuple(participants), mean)

    def reevaluate(self, round_index: int) -> list[MetricRow]:
        """Score the saved checkpoints of a complete round again (``pfedmoap evaluate``)."""
        server_state, client_states = self.load_round(round_index)
        start_state = self.load_round(round_index - 1)[0] if round_index > 0 else self.initial_state()
        participants = sample_clients(self.num_clients, self.settings.frac, self.settings.seed, round_index) if self.method.trains else []
        view = RoundView(round_index, frozenset(participants), start_state, server_state, client_states)
        return self.metric_rows(round_index, self.evaluate(view), {})
