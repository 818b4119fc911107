"""The server half on Flower: the engine's round, with the clients on nodes.

One round t, exactly as :class:`pfedmoap_cli.engine.federation.Federation`
runs it in one process, but with every client step sent to the node that
holds the client:

1. participants from the engine's seeded sampler (not Flower's);
2. each participant's node gets its own ``train`` message with the method's
   :meth:`client_download` (a pFedMoAP client gets exactly its experts) and
   answers with its upload; nodes that do not answer within the round
   timeout are recorded as missing and the round goes on without them
   (a deployment), or are asked again and then stop the run before anything
   of the round is written (a simulation, where every node is this machine's
   and a missing client is a failure, not a fault to model);
3. the method aggregates the uploads that arrived (FedAvg weights over the
   clients that answered);
4. every client's node gets an ``evaluate`` message with the method's
   evaluation download, personalises (methods that do) and scores the client
   on its own test set, where its state is (in the rounds ``--eval-every``
   picks; methods that personalise take the step every round, and the scores
   of the other rounds are not recorded);
5. the server writes the metric rows, its checkpoint, the round's manifest
   and the round marker, so
   ``report``, ``evaluate`` and ``--resume`` read the run like any other; a
   restarted server resumes after the last complete round.

Flower node ids are not client ids: every node that appears is asked (a
``query`` message) which client it holds, and refused nodes are left out with
their one-line reason logged on both sides; a node that did not answer the
question yet is waited for again in the next round.

A message is sent once and waited for until it is answered: a step or a
question that timed out is not sent again (the node may only be slow, and a
second copy would queue behind the first, so a slow start would grow into a
backlog that is never worked off); only a message that came back with an
error is sent anew.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from pfedmoap_cli.artifacts.metrics import append_metrics
from pfedmoap_cli.artifacts.partition import Partition
from pfedmoap_cli.engine.evaluation import ClientScore
from pfedmoap_cli.engine.federation import RoundSummary, clone_state
from pfedmoap_cli.engine.recorder import RunRecorder
from pfedmoap_cli.engine.run_record import completed_rounds, mark_round_complete
from pfedmoap_cli.engine.schedule import is_evaluated_round
from pfedmoap_cli.engine.workspace import RunPaths
from pfedmoap_cli.errors import FederationError
from pfedmoap_cli.flower.protocol import (
    DOWNLOAD_RECORD,
    EVALUATE,
    NODE_RECORD,
    QUERY,
    RESULT_RECORD,
    ROUND_RECORD,
    RUN_RECORD,
    SCORE_RECORD,
    TRAIN,
    UPLOAD_RECORD,
    RunInfo,
)
from pfedmoap_cli.flower.records import json_config, payload_bytes, record_to_state, state_to_record
from pfedmoap_cli.methods.base import ClientResult, FederatedMethod, RoundView, State
from pfedmoap_cli.seeding import sample_clients


@dataclass(frozen=True)
class FlowerOptions:
    """How long the server waits for nodes (seconds)."""

    #: Longest wait for the replies of one step of a round (train, or evaluate);
    #: nodes that have not answered by then are recorded as missing.
    round_timeout: float = 3600.0
    #: Longest wait, before the first round, for every client to have a node.
    join_timeout: float = 300.0
    #: Longest wait for a node's answer to the handshake (it opens its data and model).
    query_timeout: float = 300.0
    #: How many more times a client's step is sent after it failed (an error
    #: reply, a refusal, or no reply in time) before the client counts as failed.
    retries: int = 0
    #: A client that still failed stops the run with :class:`FederationError`
    #: (the round is not recorded; ``--resume`` redoes it) instead of being
    #: recorded as missing. For simulations: there, a missing client is a crash.
    require_every_client: bool = False


#: The server asks for the replies it waits for after the first of these
#: pauses (seconds), doubling it up to the second.
POLL_S = (0.02, 1.0)


def error_summary(reason: str) -> str:
    """One line of a node's error reply.

    Flower puts a ClientApp's whole remote traceback in the reason; what a
    user needs on one line is its last line (the exception and its message).
    """
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    if not lines:
        return "an error without a reason"
    last = lines[-1].removesuffix("'>").strip()
    marker = "occurred. Message:"  # Flower's wrapper of the ClientApp's own exception
    if marker in last:
        return f"the ClientApp raised: {last.split(marker, 1)[1].strip()}"
    return last


def _log(text: str) -> None:
    print(f"pfedmoap server: {text}", file=sys.stderr, flush=True)


class FlowerServer:
    """Runs (or resumes) one run's rounds over a Flower :class:`Grid`."""

    def __init__(
        self,
        grid: Grid,
        method: FederatedMethod,
        run: RunInfo,
        partition: Partition,
        paths: RunPaths,
        options: FlowerOptions = FlowerOptions(),
        progress: bool = True,
        log: Callable[[str], None] = _log,
    ) -> None:
        self.grid, self.method, self.run_info = grid, method, run
        self.settings = run.settings
        self.num_clients = partition.num_clients
        self.paths, self.options, self.progress, self.log = paths, options, progress, log
        self.recorder = RunRecorder(run.run_id, run.settings, partition, run.partition_sha256, paths)
        self.device = method.env.device
        self.node_of: dict[int, int] = {}  # client id -> Flower node id
        self.asked: set[int] = set()  # node ids that answered (or refused) the question which client they hold
        #: (node id, step key) -> id of the message sent and not answered yet
        self.in_flight: dict[tuple[int, tuple], str] = {}

    # ---- messages ----------------------------------------------------------
    def _content(self, **records) -> RecordDict:
        return RecordDict({RUN_RECORD: json_config(run=self.run_info.to_json()), **records})

    def _exchange(self, messages: dict[int, Message | None], timeout: float, key: tuple) -> tuple[dict[int, Message], dict[int, str]]:
        """Hear from each node of ``messages``; the replies that arrived in time and why the others did not, by node id.

        ``key`` names the step (``("query",)``, ``("train", round)``, ...).
        Each node gets its own message, unless one of the same step is still
        in flight to it (its entry may then be ``None``): the wait goes on for
        that one instead of queueing a second copy behind it. Replies are
        matched to what was sent by message id: an error about an unreachable
        node comes from the SuperLink, not from that node.
        """
        if not messages:
            return {}, {}
        problems: dict[int, str] = {}
        fresh = [(node, message) for node, message in messages.items() if (node, key) not in self.in_flight]
        if fresh:
            accepted = set(self.grid.push_messages([message for _, message in fresh]))
            for node, message in fresh:
                if message.metadata.message_id in accepted:
                    self.in_flight[(node, key)] = message.metadata.message_id
                else:
                    problems[node] = "the message could not be sent"
                    self.log(f"node {node}: the {key[0]} message could not be sent")
        waiting = {self.in_flight[(node, key)]: node for node in messages if (node, key) in self.in_flight}
        answered: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        pause = POLL_S[0]
        while waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                del self.in_flight[(node, key)]  # answered: a later step of this key is a new message
                if reply.has_error():
                    problems[node] = f"error: {error_summary(reply.error.reason)}"
                    self.log(f"node {node} did not answer: {error_summary(reply.error.reason)}")
                    continue
                refusal = reply.content.config_records.get(NODE_RECORD)
                if refusal is not None and refusal.get("refused"):
                    problems[node] = f"refused: {refusal['refused']}"
                    self.log(f"node {node} (client {refusal.get('client_id')}) refused: {refusal['refused']}")
                    continue
                answered[node] = reply
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            pause = min(pause * 2, POLL_S[1])
        for node in waiting.values():
            problems[node] = f"no reply within {timeout:g} s"
            self.log(f"node {node} did not answer within {timeout:g} s")
        return answered, problems

    def forget_steps_before(self, round_index: int) -> None:
        """Stop waiting for the unanswered steps of earlier rounds: their replies, if any come, are late."""
        self.in_flight = {k: v for k, v in self.in_flight.items() if not (len(k[1]) > 1 and k[1][1] < round_index)}

    # ---- which node holds which client ---------------------------------------
    def discover(self) -> None:
        """Ask every new node which client it holds; forget nodes that left."""
        present = set(self.grid.get_node_ids())
        self.node_of = {c: n for c, n in self.node_of.items() if n in present}
        self.in_flight = {k: v for k, v in self.in_flight.items() if k[0] in present}  # a node that left answers nothing
        new = sorted(present - self.asked)
        if not new:
            return
        queries = {node: Message(self._content(), dst_node_id=node, message_type=QUERY) for node in new}
        answered, problems = self._exchange(queries, self.options.query_timeout, (QUERY,))
        # A refusal is final for that node process; no answer (an error, a
        # timeout) is not: such a node is asked again next time.
        self.asked.update(answered)
        self.asked.update(node for node, why in problems.items() if why.startswith("refused"))
        for node, reply in sorted(answered.items()):
            client = int(reply.content.config_records[NODE_RECORD]["client_id"])
            previous = self.node_of.get(client)
            if previous is not None and previous != node:
                self.log(f"client {client} moved from node {previous} to node {node} (a restarted SuperNode)")
            self.node_of[client] = node

    def wait_for_clients(self) -> None:
        """Discover nodes until every client has one, or the join timeout passes."""
        deadline = time.monotonic() + self.options.join_timeout
        while True:
            self.discover()
            if len(self.node_of) == self.num_clients or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        absent = sorted(set(range(self.num_clients)) - set(self.node_of))
        if absent and self.options.require_every_client:
            # A simulation's nodes all exist from the start: one that never answers
            # is a runtime that started no worker for it, not a node still joining.
            raise FederationError(
                f"no node answered for clients {absent} within {self.options.join_timeout:g} s of the start, so nothing was trained; "
                "in a simulation this means Flower's runtime (Ray) started no worker for them: read its logs, "
                "fix the cause and run the same command with --resume"
            )
        if absent:
            self.log(f"starting without a node for clients {absent}; they are recorded as missing until one joins")

    # ---- the loop ------------------------------------------------------------
    def run(self, stop_after: int | None = None, on_round: Callable[[RoundSummary], None] | None = None) -> int:
        """Train from the last complete round to the end; return rounds completed."""
        total = self.settings.rounds
        # execute_run has already brought the folder back to its last verified round.
        done = completed_rounds(self.paths, total)
        if done > 0:
            server_state = self.recorder.load_server_state(done - 1, self.device)
        else:
            server_state = self.method.initial_state()
        end = total if stop_after is None else min(total, stop_after)
        if done < end:
            self.wait_for_clients()
        rounds = tqdm(range(done, end), desc=f"{self.settings.method} rounds (flower)", disable=not self.progress, initial=done, total=total)
        for round_index in rounds:
            server_state, summary = self.run_round(round_index, server_state)
            if summary.mean_accuracy == summary.mean_accuracy:  # NaN: a round --eval-every skipped
                rounds.set_postfix(acc=f"{summary.mean_accuracy:.3f}")
            if on_round is not None:
                on_round(summary)
        return max(done, end)

    def run_round(self, round_index: int, server_state: State) -> tuple[State, RoundSummary]:
        """One complete round, persisted; returns the new server state and a summary."""
        participants = sample_clients(self.num_clients, self.settings.frac, self.settings.seed, round_index)
        start_state = clone_state(server_state)
        self.forget_steps_before(round_index)
        self.discover()
        results = self.train_round(round_index, start_state, participants) if self.method.trains else {}
        missing_train = sorted(set(participants) - set(results)) if self.method.trains else []
        new_state = self.method.aggregate(start_state, results, round_index) if results else start_state
        view = RoundView(round_index, frozenset(results), start_state, new_state, {})
        evaluated = is_evaluated_round(round_index, self.settings.rounds, self.settings.eval_every)
        # Nodes personalise in their evaluate step: methods that personalise every
        # round still take it in rounds --eval-every skips; their scores are dropped.
        scores = self.evaluate_round(view, trained=set(results)) if evaluated or self.method.personalizes else []
        scores = scores if evaluated else []
        missing_test = sorted(set(range(self.num_clients)) - {s.client_id for s in scores}) if evaluated else []
        if missing_train or missing_test:
            self.log(f"round {round_index}: missing in training {missing_train}, in evaluation {missing_test}")
        rows = self.recorder.metric_rows(round_index, scores, results, missing_train, missing_test)
        append_metrics(self.paths.metrics_csv, rows)
        self.drop_unchanged_client_copies(round_index, trained=set(results))
        self.recorder.save_server_state(round_index, new_state)
        # Seals whatever checkpoints are in the server's round folder: its own,
        # and in a simulation the nodes' (a deployment's stay on the nodes).
        self.recorder.write_manifest(round_index, rows)
        mark_round_complete(self.paths, round_index + 1, self.settings.rounds)
        self.recorder.prune(round_index + 1)  # only once the round is complete
        mean = sum(s.accuracy for s in scores) / len(scores) if scores else float("nan")
        return new_state, RoundSummary(round_index, tuple(participants), mean)

    def drop_unchanged_client_copies(self, round_index: int, trained: set[int]) -> None:
        """Remove the copies nodes saved in this round's folder of states that did not change in it.

        A node saves its client's state after every evaluate step; unless the
        method personalises every round, the state of a client that did not
        train is the one an earlier round wrote, which the manifest points to.
        The round then holds what changed in it, as the in-process engine
        writes it. (In a deployment the nodes' files are not in this folder.)
        """
        if self.method.personalizes:
            return
        for client in range(self.num_clients):
            if client not in trained:
                self.paths.client_checkpoint(round_index, client).unlink(missing_ok=True)

    def _step_message(self, client: int, kind: str, round_index: int, download: ArrayRecord, **extra) -> Message:
        content = self._content(**{ROUND_RECORD: json_config(round=round_index, client_id=client, **extra), DOWNLOAD_RECORD: download})
        return Message(content, dst_node_id=self.node_of[client], message_type=kind, group_id=str(round_index))

    def _gather(self, kind: str, round_index: int, clients: Iterable[int], build: Callable[[int], Message]) -> dict[int, Message]:
        """One step of a round for ``clients``: their replies by client id.

        Clients whose step failed are sent it again ``retries`` times; with
        ``require_every_client``, one that still failed (or has no node) stops
        the run before anything of the round is written.
        """
        clients = list(clients)
        pending = [c for c in clients if c in self.node_of]
        replies: dict[int, Message] = {}
        why: dict[int, str] = {c: "no node holds it" for c in clients if c not in self.node_of}
        key = (kind, round_index)
        for attempt in range(1 + max(self.options.retries, 0)):
            if attempt > 0:
                resent = [c for c in pending if (self.node_of[c], key) not in self.in_flight]
                still = [c for c in pending if c not in resent]
                if resent:
                    self.log(f"round {round_index}: sending {kind} again to clients {resent} (attempt {attempt + 1})")
                if still:
                    self.log(f"round {round_index}: waiting longer for {kind} of clients {still} (attempt {attempt + 1})")
            answered, problems = self._exchange(
                {self.node_of[c]: None if (self.node_of[c], key) in self.in_flight else build(c) for c in pending},
                self.options.round_timeout, key,
            )
            for client in pending:
                node = self.node_of[client]
                if node in answered:
                    replies[client] = answered[node]
                    why.pop(client, None)
                else:
                    why[client] = problems.get(node, "no reply")
            pending = [c for c in pending if c not in replies]
            if not pending:
                break
        if self.options.require_every_client and why:
            first = min(why)
            raise FederationError(
                f"round {round_index}: {kind} failed for clients {sorted(why)} (client {first}: {why[first]}); "
                "nothing of this round was written: fix the cause and run the same command with --resume"
            )
        return replies

    def train_round(self, round_index: int, start_state: State, participants: list[int]) -> dict[int, ClientResult]:
        """Send every reachable participant its own download; the results that came back."""
        reachable = [c for c in participants if c in self.node_of]
        downloads = {c: state_to_record(self.method.client_download(start_state, c, round_index)) for c in reachable}
        replies = self._gather(TRAIN, round_index, participants, lambda c: self._step_message(c, TRAIN, round_index, downloads[c]))
        results = {}
        for client, reply in sorted(replies.items()):
            upload_record = reply.content.array_records[UPLOAD_RECORD]
            metrics = reply.content.metric_records[RESULT_RECORD]
            results[client] = ClientResult(
                upload=record_to_state(upload_record, self.device),
                client_state={},  # stays on the node
                num_examples=int(metrics["num_examples"]),
                train_loss=float(metrics["train_loss"]),
                bytes_down=payload_bytes(downloads[client]),
                bytes_up=payload_bytes(upload_record),
            )
        return results

    def evaluate_round(self, view: RoundView, trained: set[int]) -> list[ClientScore]:
        """Every reachable client scored on its node; the scores that came back, by client id."""
        downloads = {c: state_to_record(self.method.evaluation_download(view, c)) for c in range(self.num_clients) if c in self.node_of}
        replies = self._gather(
            EVALUATE, view.round_index, range(self.num_clients),
            lambda c: self._step_message(c, EVALUATE, view.round_index, downloads[c], trained=c in trained),
        )
        scores = []
        for client, reply in sorted(replies.items()):
            values = reply.content.metric_records[SCORE_RECORD]
            extra = {key[len("extra.") :]: float(value) for key, value in values.items() if key.startswith("extra.")}
            scores.append(ClientScore(client, float(values["accuracy"]), float(values["loss"]), int(values["num_examples"]), extra))
        return scores

