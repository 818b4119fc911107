"""The round loop: sampling, local updates, aggregation, evaluation, checkpoints, resume.

One round t (PROTOCOL.md sections 3 and 4):

1. sample the participants (seeded by the experiment seed and t);
2. snapshot the server state; every participant trains from that snapshot and
   its own state, with data order and augmentation seeded by (seed, t, client),
   so the order in which clients run cannot change any number;
3. the method aggregates the uploads into the new server state;
4. every client is scored on its own test set (in the rounds ``--eval-every``
   picks, and the last one; :mod:`pfedmoap_cli.engine.schedule`), and on a
   base-to-novel partition also on all base and all novel test images
   (:mod:`pfedmoap_cli.engine.generalisation`);
5. metrics rows, the server checkpoint and the checkpoints of the clients
   whose state changed in the round are written, then the round's manifest
   (hashes of those files, where every client's latest state lies, its metric
   rows), and only then is the round marked complete. Then the checkpoints
   ``--keep-rounds`` no longer keeps are deleted
   (:mod:`pfedmoap_cli.engine.retention`). ``resume`` restarts after the
   last complete round and reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from tqdm.auto import tqdm

from pfedmoap_cli.artifacts.metrics import MetricRow, append_metrics
from pfedmoap_cli.engine.batched_round import train_participants
from pfedmoap_cli.engine.client_data import ClientTrainImages, epoch_batches, ordered_batches
from pfedmoap_cli.engine.decoded_batches import decoded_epoch_batches
from pfedmoap_cli.engine.evaluation import ClientScore, score_client
from pfedmoap_cli.engine.generalisation import GeneralisationScorer
from pfedmoap_cli.engine.recorder import RunRecorder, to_device
from pfedmoap_cli.engine.retention import refuse_deleted_round
from pfedmoap_cli.engine.run_record import completed_rounds, mark_round_complete
from pfedmoap_cli.engine.schedule import is_evaluated_round
from pfedmoap_cli.seeding import derive_seed, sample_clients, torch_generator
from pfedmoap_cli.engine.session import Session
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.errors import ArtifactError, DataError
from pfedmoap_cli.methods.base import ClientEvaluator, ClientJob, ClientResult, RoundView, State, tensor_bytes
from pfedmoap_cli.model.tensor_augment import AugmentSettings, TensorAugment


@dataclass(frozen=True)
class RoundSummary:
    """What a finished round reports back (for progress bars and callers)."""

    round_index: int
    participants: tuple[int, ...]
    mean_accuracy: float


def clone_state(state: Mapping[str, torch.Tensor]) -> State:
    """A detached copy of ``state`` (the round-start snapshot every participant trains from)."""
    return {k: v.detach().clone() for k, v in state.items()}


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
        self.recorder = RunRecorder(run_id, self.settings, self.partition, session.partition_sha256, paths)
        # Base-to-novel partitions: every evaluated round also scores all base and novel test images.
        self.generalisation = (
            GeneralisationScorer(self.method, self.partition.novel_class_names, session.test_labels, self.settings.eval_batch_size)
            if self.partition.base_to_novel
            else None
        )
        clip = session.clip
        # The tensor pipeline's augmentation, built once (not per client job).
        self.tensor_augment = (
            TensorAugment(AugmentSettings(clip.image_size, clip.mean, clip.std), session.device) if self.settings.image_pipeline == "tensor" else None
        )

    # ---- state -----------------------------------------------------------
    def initial_state(self) -> State:
        """The server state before round 0 (seeded, so evaluate can rebuild it)."""
        return to_device(self.method.initial_state(), self.session.device)

    def save_round(self, round_index: int, server_state: State, changed_states: Mapping[int, State]) -> None:
        """Write the server checkpoint and the checkpoints of the clients whose state changed in the round.

        The other clients' states stay in the files earlier rounds wrote; the
        round's manifest points to them.
        """
        self.recorder.save_server_state(round_index, server_state)
        for client_id, state in changed_states.items():
            self.recorder.save_client_state(round_index, client_id, state)

    def load_round(self, round_index: int) -> tuple[State, dict[int, State]]:
        """Read the checkpoints of a complete round back (on this run's device), client states through its manifest."""
        device = self.session.device
        return self.recorder.load_server_state(round_index, device), self.recorder.load_client_states(round_index, device)

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
        # makes the update independent of which clients ran before. The
        # batches also carry the seed and swap in a private copy of that
        # stream per batch, so clients trained in lock step (batched_round)
        # get exactly these draws too.
        augment_seed = derive_seed(seed, "augment", *tags, round_index, client_id)
        torch.manual_seed(augment_seed)
        client = self.partition.clients[client_id]
        shuffle = torch_generator(seed, "shuffle", *tags, round_index, client_id)
        plain = ClientTrainImages(self.session.source, self.session.train_samples, client.train, self.test_transform)
        if self.tensor_augment is not None:
            # Images decoded once per session, augmented as tensors from a
            # generator seeded with the augment seed: the same sample order
            # as the PIL path, and the same crops and flips.
            batches = decoded_epoch_batches(
                self.session.train_images,
                client.train,
                [self.session.train_samples[i].label for i in client.train],
                self.settings.batch_size,
                shuffle,
                torch_generator(seed, "augment", *tags, round_index, client_id),
                self.session.device,
                self.tensor_augment,
            )
        else:
            dataset = ClientTrainImages(self.session.source, self.session.train_samples, client.train, self.train_transform)
            batches = epoch_batches(
                dataset, self.settings.batch_size, shuffle, self.session.device, self.settings.num_workers, augment_seed=augment_seed
            )
        return ClientJob(
            client_id=client_id,
            round_index=round_index,
            server_state=server_state,
            client_state=client_state,
            batches=batches,
            num_examples=len(client.train),
            generator=torch_generator(seed, "method", *tags, round_index, client_id),
            plain_batches=ordered_batches(plain, self.settings.eval_batch_size, self.session.device, self.settings.num_workers),
        )

    def train_client(self, client_id: int, round_index: int, download: State, client_state: State | None) -> ClientResult:
        """One client's local update on its download, with its own seeds; its traffic filled in.

        ``download`` is what the server sent (:meth:`FederatedMethod.client_download`).
        """
        result = self.method.train_client(self.client_job(client_id, round_index, download, client_state))
        result.bytes_down, result.bytes_up = tensor_bytes(download), tensor_bytes(result.upload)
        return result

    def personalize_client(self, client_id: int, round_index: int, server_state: State, client_state: State | None) -> State | None:
        """One client's post-aggregation personal state (None when the method returns nothing)."""
        job = self.client_job(client_id, round_index, server_state, client_state, stream="personalize")
        return self.method.personalize_client(job) or None

    def personalize(self, round_index: int, server_state: State, client_states: dict[int, State]) -> dict[int, State]:
        """Every client's post-aggregation personal state (methods with :attr:`personalizes`)."""
        updated = dict(client_states)
        for client_id in tqdm(range(self.num_clients), desc=f"round {round_index} fine-tuning", leave=False, disable=not self.progress):
            state = self.personalize_client(client_id, round_index, server_state, client_states.get(client_id))
            if state:
                updated[client_id] = state
        return updated

    # ---- evaluation ------------------------------------------------------
    def evaluate(self, view: RoundView) -> list[ClientScore]:
        """Score every client on its own test set."""
        return self.evaluate_round(view)[0]

    def evaluate_round(self, view: RoundView) -> tuple[list[ClientScore], dict[str, list[ClientScore]]]:
        """Every client's scores on its own test set, and (base-to-novel runs) by generalisation split.

        The second item maps ``"base"`` and ``"novel"`` to every client's
        score (empty for other runs); one evaluator serves both.
        """
        evaluator = self.method.evaluator(view)
        scores = self.score_clients(evaluator, range(self.num_clients))
        if self.generalisation is None:
            return scores, {}
        return scores, self.generalisation.score(view, evaluator, self.session.test_features, range(self.num_clients))

    def score_clients(self, evaluator: ClientEvaluator, client_ids) -> list[ClientScore]:
        """Score the given clients on their own test sets with ``evaluator``."""
        scores = []
        for client_id in client_ids:
            client = self.partition.clients[client_id]
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

    def metric_rows(
        self,
        round_index: int,
        scores: list[ClientScore],
        results: Mapping[int, ClientResult],
        generalisation: Mapping[str, list[ClientScore]] | None = None,
    ) -> list[MetricRow]:
        """Long-format rows for one round: test metrics of all, base/novel scores, train metrics of participants."""
        return self.recorder.metric_rows(round_index, scores, results, generalisation=generalisation or {})

    # ---- the loop --------------------------------------------------------
    def run(self, stop_after: int | None = None, on_round: Callable[[RoundSummary], None] | None = None) -> int:
        """Train from the last complete round to the end; return rounds completed.

        ``stop_after`` ends the call after that many rounds in total (used to
        simulate an interruption in tests); the run can then be resumed.
        """
        total = self.settings.rounds
        # execute_run has already brought the folder back to its last verified
        # round (prepare_resume hashes every checkpoint: once per start is enough).
        done = completed_rounds(self.paths, total)
        if done > 0:
            server_state, client_states = self.load_round(done - 1)
        else:
            server_state, client_states = self.initial_state(), {}
        end = total if stop_after is None else min(total, stop_after)
        rounds = tqdm(range(done, end), desc=f"{self.settings.method} rounds", disable=not self.progress, initial=done, total=total)
        for round_index in rounds:
            server_state, client_states, summary = self.run_round(round_index, server_state, client_states)
            if summary.mean_accuracy == summary.mean_accuracy:  # NaN: a round --eval-every skipped
                rounds.set_postfix(acc=f"{summary.mean_accuracy:.3f}")
            if on_round is not None:
                on_round(summary)
        return max(done, end)

    def run_round(self, round_index: int, server_state: State, client_states: dict[int, State]):
        """One complete round, persisted; returns the new states and a summary."""
        participants = sample_clients(self.num_clients, self.settings.frac, self.settings.seed, round_index)
        start_state = clone_state(server_state)
        results: dict[int, ClientResult] = {}
        if self.method.trains:
            self.method.prepare_round(round_index, start_state, tuple(participants))
            # All participants in lock step where the method and --batched allow
            # it (equal to client by client within float rounding), else one by one.
            batched = train_participants(self, round_index, participants, start_state, client_states)
            if batched is not None:
                results = batched
            else:
                for client_id in tqdm(participants, desc=f"round {round_index} clients", leave=False, disable=not self.progress):
                    download = self.method.client_download(start_state, client_id, round_index)
                    results[client_id] = self.train_client(client_id, round_index, download, client_states.get(client_id))
        # States change only after every participant has trained (order independence).
        new_client_states = dict(client_states)
        for client_id, result in results.items():
            if result.client_state:  # empty states are not kept, exactly as after a resume
                new_client_states[client_id] = result.client_state
        new_server_state = self.method.aggregate(start_state, results, round_index) if results else start_state
        if self.method.personalizes:
            new_client_states = self.personalize(round_index, new_server_state, new_client_states)
        view = RoundView(round_index, frozenset(participants), start_state, new_server_state, new_client_states)
        evaluated = is_evaluated_round(round_index, self.settings.rounds, self.settings.eval_every)
        scores, generalisation = self.evaluate_round(view) if evaluated else ([], {})
        rows = self.metric_rows(round_index, scores, results, generalisation)
        append_metrics(self.paths.metrics_csv, rows)
        # A state object that was replaced this round changed; the others are on disk already.
        changed = {c: state for c, state in new_client_states.items() if state is not client_states.get(c)}
        self.save_round(round_index, new_server_state, changed)
        # The manifest seals what was written; only then is the round complete.
        self.recorder.write_manifest(round_index, rows)
        mark_round_complete(self.paths, round_index + 1, self.settings.rounds)
        self.recorder.prune(round_index + 1)  # only now: a kill before this leaves the old files, never too few
        mean = sum(s.accuracy for s in scores) / len(scores) if scores else float("nan")
        return new_server_state, new_client_states, RoundSummary(round_index, tuple(participants), mean)

    def reevaluate(self, round_index: int) -> list[MetricRow]:
        """Score the saved checkpoints of a complete round again (``pfedmoap evaluate``).

        The round (and the server checkpoint of the one before, whose state it
        started from) must verify against their manifests first. A round whose
        checkpoints ``--keep-rounds`` deleted is refused in one line.
        """
        refuse_deleted_round(self.paths, self.run_id, round_index, completed_rounds(self.paths, self.settings.rounds))
        self.recorder.verify_round(round_index)
        if round_index > 0:
            before = self.recorder.verify_round(round_index - 1, complete=False)
            if "global.safetensors" in before.files and not self.paths.global_checkpoint(round_index - 1).is_file():
                raise ArtifactError(f"checkpoint {self.paths.global_checkpoint(round_index - 1)} is missing (round {round_index - 1}'s manifest lists it); "
                                    "it is the start state of the round to re-score: restore it or retrain the run")
        server_state, client_states = self.load_round(round_index)
        device = self.session.device
        # Only the server state of the round before: its clients' states may be deleted (--keep-rounds).
        start_state = self.recorder.load_server_state(round_index - 1, device) if round_index > 0 else self.initial_state()
        participants = sample_clients(self.num_clients, self.settings.frac, self.settings.seed, round_index) if self.method.trains else []
        view = RoundView(round_index, frozenset(participants), start_state, server_state, client_states)
        # Base-to-novel runs re-score base and novel too, as training scored them.
        scores, generalisation = self.evaluate_round(view)
        return self.metric_rows(round_index, scores, {}, generalisation)
